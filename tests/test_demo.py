import json

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
