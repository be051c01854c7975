import json

import pytest

from launch import demo


def test_demo_bound_matches_entropy_and_writes_results(tmp_path, capsys):
    assert demo.run(str(tmp_path), examples=4000) == 0
    report = json.loads((tmp_path / "objective.json").read_text())
    for name, bound in report["bounds"].items():
        assert abs(bound["nats_per_dim"] - report["entropy_nats_per_dim"]) < 4 * bound["stderr"] + 0.01, name
    for sampler, moments in report["samples"].items():
        for got, want in zip(moments["std"], report["data_std"]):
            assert abs(got - want) < 0.05 * max(report["data_std"]), sampler
    assert "results written to" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_evaluates_every_checkpoint_and_prints_the_report(tmp_path, capsys):
    short = ("total_images=4096", "checkpoint.every_images=2048", "sample_every_images=2048",
             "optimizer.warmup_images=1024")
    assert demo.main(str(tmp_path), overrides=short, samples=20, ref_images=20) == 0
    out = capsys.readouterr().out
    report = tmp_path / "runs" / "demo" / "report" / "index.html"
    assert f"the run's report: {report.resolve()}" in out and report.is_file()
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "demo" / "evals").glob("*/*.json")]
    names = {r["metric"] for r in results}
    assert names == {"fid_random_inception20-guidance2", "is_random_inception20-guidance2", "bpd"}
    assert len(results) == 6 and all(r["status"] == "ok" for r in results)  # both checkpoints, every metric
    assert all(name in out for name in names) and "not FID or IS" in out
    assert (tmp_path / "data-val" / "index.json").is_file()
