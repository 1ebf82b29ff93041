"""Adaptation methods, chosen by name in ``distill.method``: a method is one module plus one line here.

Each module ends in ``METHOD = Method(...)`` (:class:`pipeline.methods.base.Method`): its params block
``distill.<name>`` with the spec's defaults, the models it needs, its training and its parameter counts.
The source prompt pretraining of the teacher (the ``prompts`` stage) is :mod:`pipeline.methods.source_prompts`.
"""
from pipeline.methods import cmkd, dapl, ekda, pda, promptkd
from pipeline.methods.base import Method

METHODS: dict[str, Method] = {
    "promptkd": promptkd.METHOD,
    "ekda": ekda.METHOD,
    "dapl": dapl.METHOD,
    "cmkd": cmkd.METHOD,
    "pda": pda.METHOD,
}
