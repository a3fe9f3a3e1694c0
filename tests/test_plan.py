"""`trec-rank plan`: one-process plans for large clusters, JSON plans, training from a saved plan."""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import run_cli
from trec_rank.cli import load_job
from trec_rank.config.experiment import load_config
from trec_rank.plan.cli import add_subcommand
from trec_rank.plan.io import load_plan, plan_from_dict, plan_to_dict
from trec_rank.plan.planning import Cluster, plan_cluster
from trec_rank.runtime.model import ranking_spec

CONFIG = "configs/ml100k_base.yaml"
LARGE = "configs/synthetic_large.yaml"
# one table per sharding type, so a round trip sees DP (no shards), single- and multi-shard specs
EVERY_TYPE = ["sharding.constraints.user={sharding_types: [row_wise]}",
              "sharding.constraints.item={sharding_types: [column_wise]}",
              "sharding.constraints.age={sharding_types: [data_parallel]}",
              "sharding.constraints.occupation={sharding_types: [table_row_wise]}",
              "sharding.constraints.year={sharding_types: [table_column_wise]}",
              "sharding.constraints.gender={sharding_types: [table_wise]}"]


def plan_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run `trec-rank plan ARGS` in this process through the subcommand's own argparse wiring."""
    parser = argparse.ArgumentParser(prog="trec-rank")
    add_subcommand(parser.add_subparsers(dest="command", required=True), load_job)
    ns = parser.parse_args(["plan", *args])
    try:
        ns.func(ns)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().out


def test_64_ranks_on_8_hosts_in_one_process(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    code, text = plan_cli(capsys, LARGE, "--world-size", "64", "--local-world-size", "8", "--device", "cuda",
                          "--hbm-gb", "80", "--format", "json", "--out", str(out))
    assert code == 0 and not dist.is_initialized()
    report = json.loads(text)
    assert report["summary"]["fits"] and report["summary"]["tables"] == 200
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == list(range(64)) and {r["host"] for r in ranks} == set(range(8))
    assert all(r["hbm_used_gb"] <= r["hbm_cap_gb"] == 80 for r in ranks)
    item = next(t for t in report["tables"] if t["table"] == "item")
    assert (item["module"], item["rows"], item["dim"]) == ("model.ec", 10**9, 128)
    assert item["sharding_type"] == "row_wise" and sorted(item["ranks"]) == list(range(64))
    assert sum(size[0] for size in item["shard_sizes"]) == 10**9
    doc = json.loads(out.read_text())
    assert doc["inputs"]["world_size"] == 64 and doc["inputs"]["local_world_size"] == 8
    for shard in doc["plan"]["model.ec"]["item"]["shards"]:
        rank = int(re.match(r"rank:(\d+)/", shard["placement"]).group(1))
        assert shard["placement"] == f"rank:{rank}/cuda:{rank % 8}"
    assert len(doc["plan"]["model.ebc"]) + len(doc["plan"]["model.ec"]) == 200


def test_json_round_trip_is_exact() -> None:
    cfg = load_config(CONFIG, EVERY_TYPE)
    plan = plan_cluster(ranking_spec(cfg), Cluster(16, 4, "cuda", hbm_gb=16)).plan
    kinds = {ps.sharding_type for mplan in plan.plan.values() for ps in mplan.values()}
    assert kinds == {"row_wise", "column_wise", "data_parallel", "table_row_wise", "table_column_wise",
                     "table_wise"}
    back = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert back == plan
    moved = copy.deepcopy(back)
    shard = moved.plan["model.ebc"]["user"].sharding_spec.shards[0]
    shard.shard_offsets = [shard.shard_offsets[0] + 1, 0]
    assert moved != plan  # equality is deep: a moved shard is noticed


def test_plan_does_not_depend_on_the_process_hash_seed(tmp_path: Path) -> None:
    # torchrec orders tied options through Python sets: hash seed 2 once chose table_column_wise where
    # seed 1 chose table_wise, so `trec-rank plan` and the job's collective plan could disagree
    plans = []
    for seed in ("1", "2"):
        out = tmp_path / f"plan-{seed}.json"
        run_cli("plan", CONFIG, "--world-size", "2", "--local-world-size", "2", "--device", "cpu",
                "--out", str(out), env={"PYTHONHASHSEED": seed})
        plans.append(json.loads(out.read_text())["plan"])
    assert plans[0] == plans[1]
    assert {t["sharding_type"] for t in plans[0]["model.ebc"].values()} == {"table_wise"}  # first of the ties


def test_cpu_and_cuda_topologies_without_a_gpu(capsys: pytest.CaptureFixture) -> None:
    reports = {}
    for device in ("cpu", "cuda"):
        code, text = plan_cli(capsys, CONFIG, "--world-size", "4", "--local-world-size", "2", "--device", device,
                              "--format", "json")
        assert code == 0
        reports[device] = json.loads(text)
    cpu, cuda = reports["cpu"], reports["cuda"]
    assert {r["hbm_cap_gb"] for r in cpu["ranks"]} == {0} and cuda["ranks"][0]["hbm_cap_gb"] == 32
    assert cpu["summary"]["memory"] == "ddr" and cuda["summary"]["memory"] == "hbm"
    cpu_ebc = [t for t in cpu["tables"] if t["module"] == "model.ebc"]
    assert not {t["sharding_type"] for t in cpu_ebc} & {"row_wise", "table_row_wise"}
    cfg = load_config(CONFIG)
    placements = {d: [s.placement for mp in plan_cluster(ranking_spec(cfg), Cluster(4, 2, d)).plan.plan.values()
                      for ps in mp.values() if ps.sharding_spec for s in ps.sharding_spec.shards]
                  for d in ("cpu", "cuda")}
    assert {p.device().type for p in placements["cpu"]} == {"cpu"}
    assert all(p.device() == torch.device("cuda", p.rank() % 2) for p in placements["cuda"])


def test_train_from_saved_plan_matches_collective_plan(ml100k_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    plan_file, moved_file = tmp_path / "p.json", tmp_path / "moved.json"
    code, _ = plan_cli(capsys, CONFIG, "--world-size", "2", "--local-world-size", "2", "--device", "cpu",
                       "--out", str(plan_file))
    assert code == 0
    doc = json.loads(plan_file.read_text())
    name, table = next((n, t) for n, t in doc["plan"]["model.ebc"].items()  # a single-shard table
                       if t["sharding_type"] in ("table_wise", "table_column_wise") and len(t["shards"]) == 1)
    other = 1 - table["ranks"][0]  # a hand-edited plan: same fingerprint, one table-wise table on the other rank
    moved = copy.deepcopy(doc)
    moved["plan"]["model.ebc"][name].update(ranks=[other], shards=[{**table["shards"][0],
                                                                    "placement": f"rank:{other}/cpu"}])
    moved_file.write_text(json.dumps(moved))
    common = ["--set", f"data.path={ml100k_dir}/ranking", "--set", "train.max_steps=6",
              "--set", "data.eval_splits=[valid]"]
    for run, extra in (("offline", ["--plan", str(plan_file)]), ("collective", []),
                       ("moved", ["--plan", str(moved_file)])):
        run_cli("train", CONFIG, "--run-dir", str(tmp_path / run), *extra, *common, nproc=2)
    offline, collective, placed = (placements(tmp_path / run) for run in ("offline", "collective", "moved"))
    assert offline == planned(doc)  # the job placed every shard where the JSON said
    assert collective == offline  # and the in-job collective plan chose the same placement
    assert placed == planned(moved) != offline  # a plan that differs is honoured, not re-planned
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("offline", "collective"))
    assert a.keys() == b.keys() == {"valid"}
    for key, value in a["valid"].items():
        assert b["valid"][key] == pytest.approx(value, abs=1e-6), key


def planned(doc: dict) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Table -> sorted (shard offsets, rank) as a plan JSON places them."""
    return {table: sorted((tuple(s["offsets"]), int(re.match(r"rank:(\d+)/", s["placement"]).group(1)))
                          for s in ps["shards"]) for mplan in doc["plan"].values() for table, ps in mplan.items()}


def placements(run_dir: Path) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Table -> sorted (shard offsets, rank) as DCP recorded them in the run's last checkpoint."""
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    out: dict[str, list] = {}
    for index, info in FileSystemReader(str(ckpt)).read_metadata().storage_data.items():
        found = re.match(r"model\.model\.(?:ebc\.embedding_bags|ec\.embeddings)\.(\w+)\.weight$", index.fqn)
        if found:
            rank = int(re.match(r"__(\d+)_", info.relative_path).group(1))
            out.setdefault(found.group(1), []).append((tuple(index.offset), rank))
    return {table: sorted(v) for table, v in out.items()}


def test_fingerprint_mismatch_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan_file = tmp_path / "p.json"
    assert plan_cli(capsys, CONFIG, "--world-size", "2", "--device", "cpu", "--out", str(plan_file))[0] == 0
    cfg = load_config(CONFIG)
    assert load_plan(plan_file, ranking_spec(cfg), 2, 2, "cpu").plan.keys() == {"model.ebc", "model.ec"}
    with pytest.raises(ValueError, match="world_size: plan has 2, this job has 4"):
        load_plan(plan_file, ranking_spec(cfg), 4, 4, "cpu")
    with pytest.raises(ValueError, match="device: plan has 'cpu', this job has 'cuda'"):
        load_plan(plan_file, ranking_spec(cfg), 2, 2, "cuda")
    next(t for t in cfg.schema.tables if t.name == "user").embedding_dim = 32
    with pytest.raises(ValueError, match=r"table model\.ebc\.user: plan has 944x16, config has 944x32"):
        load_plan(plan_file, ranking_spec(cfg), 2, 2, "cpu")
    # the real trainer refuses it before reading data: one process != the plan's two ranks
    for split in ("train", "valid", "test"):  # the split folders must exist (checked before anything loads)
        (tmp_path / "data" / split).mkdir(parents=True)
    proc = run_cli("train", CONFIG, "--run-dir", str(tmp_path / "run"), "--plan", str(plan_file),
                   "--set", f"data.path={tmp_path / 'data'}", check=False)
    assert proc.returncode == 2 and "world_size: plan has 2, this job has 1" in proc.stderr


GIANT = """
data: {path: nowhere, group_by: ""}
schema:
  tables:
    - {name: giant, num_embeddings: 100000000, embedding_dim: 128}
    - {name: small, num_embeddings: 1000, embedding_dim: 16}
  features:
    - {name: giant_id, kind: sparse, table: giant}
    - {name: small_id, kind: sparse, table: small}
    - {name: click, kind: label}
sharding:
  constraints:
    giant: {sharding_types: [%s], compute_kernels: [fused]}
"""


def test_not_fitting_names_the_table_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one_rank = tmp_path / "tw.yaml"  # a 48 GB table that may not be split, on 16 GB ranks
    one_rank.write_text(GIANT % "table_wise")
    out = tmp_path / "never.json"
    code, text = plan_cli(capsys, str(one_rank), "--world-size", "4", "--device", "cuda", "--hbm-gb", "16",
                          "--out", str(out))
    assert code == 1 and not out.exists()
    assert "does not fit" in text and "giant 100000000x128" in text and "too large for one rank" in text
    assert "add row_wise or table_row_wise to sharding.constraints.giant.sharding_types" in text
    assert "add fused_uvm_caching to sharding.constraints.giant.compute_kernels" in text
    assert "smaller embedding_dim: giant 128 -> " in text

    cluster = tmp_path / "rw.yaml"  # splittable, but 2 x 16 GB is less than the table
    cluster.write_text(GIANT % "row_wise")
    code, text = plan_cli(capsys, str(cluster), "--world-size", "2", "--device", "cuda", "--hbm-gb", "16",
                          "--format", "json")
    diagnosis = json.loads(text)["summary"]["diagnosis"]
    assert code == 1 and diagnosis["tables"][0] == "giant" and diagnosis["tier"] == "hbm"
    assert 15 < diagnosis["shortfall_gb"] < 40
    ranks = int(re.search(r"more ranks: about (\d+)", diagnosis["message"]).group(1))
    assert ranks > 2
    code, _ = plan_cli(capsys, str(cluster), "--world-size", str(ranks), "--local-world-size", "2",
                       "--device", "cuda", "--hbm-gb", "16")
    assert code == 0  # the suggested rank count does fit

    code, text = plan_cli(capsys, CONFIG, "--world-size", "2", "--device", "cuda", "--hbm-gb", "0.001")
    assert code == 1 and "dense model, input buffers and the 15% margin alone exceed" in text


def test_compare_clusters_side_by_side(capsys: pytest.CaptureFixture) -> None:
    code, text = plan_cli(capsys, CONFIG, "--device", "cpu", "--compare", "ws=2,lws=2", "ws=4,lws=2,device=cuda,hbm=16")
    assert code == 0
    header = text.splitlines()[0]
    assert "ws=2,lws=2,cpu" in header and "ws=4,lws=2,cuda,hbm=16" in header
    assert re.search(r"^fits\s+yes\s+yes$", text, re.M) and "peak memory/rank GiB" in text
    code, text = plan_cli(capsys, CONFIG, "--world-size", "2", "--device", "cuda", "--format", "json",
                          "--compare", "hbm=0.001", "hbm=8")
    assert code == 0 and [s["fits"] for s in json.loads(text)] == [False, True]


def test_user_errors_name_the_option(capsys: pytest.CaptureFixture) -> None:
    for args, match in [(["--device", "cpu"], "--world-size is required"),
                        (["--world-size", "6", "--local-world-size", "4", "--device", "cpu"], "--local-world-size"),
                        (["--world-size", "2"], "sharding.device is 'auto'"),
                        (["--device", "cpu", "--compare", "ws=two"], "ws='two' is not a valid int"),
                        (["--device", "cpu", "--compare", "gpus=8"], "'gpus=8' is not KEY=VALUE"),
                        (["--device", "cpu", "--compare", "ws=2", "--out", "x.json"], "--out writes one plan")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            plan_cli(capsys, CONFIG, *args)


def test_help_explains_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        plan_cli(capsys, "--help")
    text = capsys.readouterr().out
    for option in ("--world-size", "--local-world-size", "--device", "--hbm-gb", "--ddr-gb", "--batch-size",
                   "--out", "--format", "--compare", "--set", "exit codes"):
        assert option in text, option


def test_torchx_component_runs_the_plan_command() -> None:
    from launch.components import plan

    app = plan("data.batch_size=512", world_size=128, config=LARGE, hbm_gb=80, out="plans/p.json",
               compare="ws=8,lws=8 ws=16,lws=8")
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.resource.gpu == 0  # the job's own python: see launch/components.py
    assert role.args[3:7] == ["-m", "trec_rank.cli", "plan", LARGE]
    args = " ".join(role.args)
    for part in ("--world-size 128", "--local-world-size 8", "--device cuda", "--hbm-gb 80", "--out plans/p.json",
                 "--compare ws=8,lws=8 ws=16,lws=8", "--set data.batch_size=512"):
        assert part in args, part
