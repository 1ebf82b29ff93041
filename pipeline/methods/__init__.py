"""Training methods: source prompt pretraining of the teacher and student distillation."""
