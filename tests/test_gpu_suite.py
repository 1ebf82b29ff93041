"""bench/gpu_suite on the CPU with tiny stand-ins: every section present, numbers positive, GPU parts skipped."""
import json

from bench import gpu_suite


def _positive(d: dict, *keys: str) -> bool:
    return all(isinstance(d[k], (int, float)) and d[k] > 0 for k in keys)


def test_gpu_suite_runs_on_cpu_and_reports_every_section(tmp_path):
    out = tmp_path / "suite.json"
    result = gpu_suite.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"caching", "ekda", "precision_steps", "faiss"} <= set(result)
    for row in result["caching"].values():
        assert _positive(row["cpu_decode"], "images", "stage_images_per_s", "model_images_per_s")
        assert 0 <= row["cpu_decode"]["share_outside_model"] < 1
        assert "skipped" in row["gpu_decode"]
    assert _positive(result["ekda"], "ekda_iteration_s", "two_stage_step_s", "student_step_s")
    for precision in ("fp32", "bf16", "fp16"):
        step = result["precision_steps"][precision]
        assert "skipped" in step or _positive(step, "student_step_s", "two_stage_step_s")
    assert result["precision_steps"]["fp32"]["student_step_s"] > 0
    assert _positive(result["faiss"]["cpu"], "build_s", "search_s", "queries_per_s")
    assert "skipped" in result["faiss"]["gpu"]
