"""The GroupViT experiment driver (nbsupport.training.groupvit.sweep, sweep_cli): a tiny sweep with a stub
trainer gives the table in the thesis's layout with mean +- std by hand, skips finished runs, runs evaluation
rows without training, launches torchrun with the row's recipe; the synthetic world with one step runs end to
end; every shipped sweep file parses and every row is a valid configuration."""

import argparse
import json
import statistics

import pytest
import torch
import yaml

from nbsupport.core.config import ConfigError, read_config, read_recipe
from nbsupport.training.groupvit import TrainConfig
from nbsupport.training.groupvit import sweep as sw
from nbsupport.training.groupvit import sweep_cli as sc

torch.set_num_threads(1)

SWEEP = {
    "table": 99,
    "title": "A planted table",
    "base": {"epochs": 3, "global_batch_size": 8},
    "seeds": [0, 1, 2],
    "datasets": ["voc", "coco_object"],
    "label_columns": ["Model", "Method"],
    "thesis_settings": {"epochs": 3, "global_batch_size": 8},
    "notes": ["a reading"],
    "variants": [
        {"row": ["GroupViT", "Original"], "train": False, "thesis": {"voc": 52.29, "coco_object": 24.3}},
        {"row": ["GroupViT", "GE"], "set": {"w_ge": 1.0}, "thesis": {"voc": 50.16}},
        {"row": ["GroupViT", "LE"], "set": {"w_le": 1.0}, "seeds": [5]},
    ],
}
ROOTS = ["-o", "data=/x/captions.json"]  # -o as the command line gives it


def _write(tmp_path, data=SWEEP, name="t99.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


class Stub:
    """Stands in for the trainer and the evaluation: mIoU = 10 * w_ge + seed (+ 0.5 on COCO), recorded."""

    def __init__(self):
        self.trained, self.evaluated = [], []

    def train(self, cfg):
        self.trained.append(cfg)
        m = 10 * cfg.w_ge + cfg.seed
        return {
            "val": {
                "type": "val",
                "epoch": cfg.epochs,
                "step": 7,
                "miou": m,
                "miou_voc": m,
                "miou_coco_object": m + 0.5,
            }
        }

    def evaluate(self, cfg):
        self.evaluated.append(cfg)
        return {"type": "val", "epoch": 0, "step": 0, "miou": 1.0, "miou_voc": 1.0, "miou_coco_object": 2.0}


def _roots(tmp_path):
    return [f"val_roots={{voc: {tmp_path}, coco_object: {tmp_path}}}"]


def test_table_by_hand_and_finished_runs_are_skipped(tmp_path):
    path, out, stub = _write(tmp_path), tmp_path / "runs", Stub()
    over = ["epochs=2", *_roots(tmp_path)]
    text = sc.run_sweep(path, out, overrides=over, train_fn=stub.train, eval_fn=stub.evaluate, echo=lambda *a: None)
    # 3 seeds of GE, 1 of LE trained; the Original row evaluated for its 3 seeds, never trained
    assert sorted((c.w_ge, c.w_le, c.seed) for c in stub.trained) == [(0, 1, 5), (1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert len(stub.evaluated) == 3 and all(c.epochs == 2 and c.batch_size == 8 for c in stub.trained)
    assert stub.trained[0].val_datasets == ["voc", "coco_object"]
    assert stub.trained[0].out_dir == str(out / "t99" / "groupvit_ge" / "seed0")
    rows = sw.results_table(sw.read_sweep(path), out)
    sd = statistics.stdev([10.0, 11.0, 12.0])  # 1.0
    assert rows[1] == {
        "Model": "GroupViT",
        "Method": "GE",
        "PVOC": f"11.00 ± {sd:.2f}",
        "PVOC (thesis)": "50.16",
        "COCO": "11.50 ± 1.00",
        "COCO (thesis)": "",
    }
    assert rows[0]["PVOC"] == "1.00 ± 0.00" and rows[0]["COCO (thesis)"] == "24.3" and rows[2]["PVOC"] == "5.00"
    assert "| Model | Method | PVOC | PVOC (thesis) | COCO | COCO (thesis) |" in text
    assert "epochs: 2 here, 3 in the thesis (rows: GroupViT | GE; GroupViT | LE)" in text  # not the evaluation row
    assert "a reading" in text and "Table 99: A planted table" in text
    assert (out / "t99" / "table.md").read_text() == text
    assert (out / "t99" / "table.csv").read_text().splitlines()[
        0
    ] == "Model,Method,PVOC,PVOC (thesis),COCO,COCO (thesis)"
    assert len((out / "t99" / "runs.csv").read_text().splitlines()) == 1 + 3 + 3 + 1
    res = json.loads((out / "t99" / "groupvit_ge" / "seed2" / "result.json").read_text())
    assert res["miou"] == {"voc": 12.0, "coco_object": 12.5} and res["row"] == ["GroupViT", "GE"]
    # a second pass runs nothing: every folder holds its result.json
    again = Stub()
    assert (
        sc.run_sweep(path, out, overrides=over, train_fn=again.train, eval_fn=again.evaluate, echo=lambda *a: None)
        == text
    )
    assert again.trained == again.evaluated == []
    # a missing seed shows as n/N
    (out / "t99" / "groupvit_ge" / "seed1" / "result.json").unlink()
    assert (
        sw.results_table(sw.read_sweep(path), out)[1]["PVOC"] == f"11.00 ± {statistics.stdev([10.0, 12.0]):.2f} (2/3)"
    )


def test_seeds_nproc_and_torchrun_launch(tmp_path):
    path, out = _write(tmp_path), tmp_path / "runs"
    launched = []

    def launcher(cmd):
        launched.append(cmd)
        recipe = cmd[cmd.index("--recipe") + 1]
        cfg = read_recipe(recipe)
        folder = (
            tmp_path / "runs" / "t99" / ("groupvit_ge" if cfg.get("w_ge") else "groupvit_le") / f"seed{cfg['seed']}"
        )
        (folder / "metrics.jsonl").write_text(
            json.dumps({"type": "val", "epoch": 3, "step": 2, "miou_voc": 30.0, "miou_coco_object": 20.0}) + "\n"
        )
        return 0

    stub = Stub()
    over = ROOTS[1:] + _roots(tmp_path)
    text = sc.run_sweep(
        path,
        out,
        seeds=[7],
        nproc=2,
        only=["GE"],
        overrides=over,
        launcher=launcher,
        eval_fn=stub.evaluate,
        echo=lambda *a: None,
    )
    assert len(launched) == 1 and launched[0][1:8] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nbsupport",
    ]
    recipe = out / "t99" / "groupvit_ge" / "seed7" / "sweep_recipe.yaml"
    cfg = read_config(TrainConfig, recipe)  # the row's merged configuration, readable as a recipe
    assert (cfg.batch_size, cfg.seed, cfg.w_ge, cfg.data) == (4, 7, 1.0, "/x/captions.json")  # 8 / 2 processes
    assert stub.evaluated == []  # --only GE
    rows = sw.results_table(sw.read_sweep(path), out, seeds=[7])
    assert rows[1]["PVOC"] == "30.00" and rows[0]["PVOC"] == "—"
    assert "global_batch_size" not in text  # 4 per process x 2 = the thesis's 8
    with pytest.raises(ConfigError, match="does not split"):
        sw.variant_config(sw.read_sweep(path), sw.read_sweep(path).variants[1], 0, out, nproc=3)


def test_real_runs_need_their_inputs(tmp_path):
    data = dict(SWEEP, requires=["data"])
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match="data=.*val_roots=\\{coco_object"):
        sc.run_sweep(path, tmp_path / "r", echo=lambda *a: None)
    lines = []
    sc.run_sweep(path, tmp_path / "r", dry_run=True, echo=lines.append)
    assert any(line.startswith("[to run] GroupViT | GE seed 0: train 3 epochs") for line in lines)
    assert any(line.startswith("a real run needs: -o data=") for line in lines)
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_synthetic_world_one_step_end_to_end(tmp_path):
    """A real in-process run: 1 step on the synthetic world, validated on synthetic scenes, and the
    evaluation-only row scored by the same validation without training."""
    data = {
        "table": "S",
        "datasets": ["synthetic"],
        "label_columns": ["Method"],
        "base": {
            "n_train": 8,
            "batch_size": 8,
            "image_size": 32,
            "epochs": 1,
            "context_length": 24,
            "val_images": 4,
            "val_size": 32,
            "tagger": "lexicon",
            "threads": 1,
        },
        "seeds": [0],
        "variants": [{"row": ["Original"], "train": False}, {"row": ["GE"], "set": {"w_ge": 1.0}}],
    }
    out = tmp_path / "runs"
    text = sc.run_sweep(_write(tmp_path, data, "syn.yaml"), out, echo=lambda *a: None)
    ge = json.loads((out / "syn" / "ge" / "seed0" / "result.json").read_text())
    orig = json.loads((out / "syn" / "original" / "seed0" / "result.json").read_text())
    assert ge["step"] == 1 and 0 <= ge["miou"]["synthetic"] <= 100 and orig["step"] == 0
    assert (out / "syn" / "ge" / "seed0" / "final.safetensors").is_file()
    assert f"| GE | {ge['miou']['synthetic']:.2f} |" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in sw.SWEEP_DIR.glob("*.yaml")))
def test_shipped_sweeps_parse_and_every_row_is_a_valid_config(name, tmp_path):
    s = sw.read_sweep(name)
    roots = {d: str(tmp_path) for d in s.datasets}
    for v in s.variants:
        for seed in s.seeds_of(v):
            cfg = sw.variant_config(s, v, seed, tmp_path, nproc=1, overrides={"val_roots": roots})
            cfg.validate()
            assert cfg.val_datasets == s.datasets and cfg.seed == seed
    trained = [v for v in s.variants if v.train]
    assert all(set(v.thesis) <= set(s.datasets) and v.thesis for v in s.variants)
    if s.name != "table14":
        assert trained and "data" in s.requires


def test_shipped_sweeps_are_the_thesis_tables():
    expected = {
        "table05",
        "table06",
        "table07",
        "table08",
        "table10",
        "table11",
        "table12",
        "table13",
        "table14",
        "table15",
        "table16",
    }
    assert {p.stem for p in sw.SWEEP_DIR.glob("*.yaml")} == expected
    t11 = sw.read_sweep("table11")
    assert [v.row[1] for v in t11.variants] == [
        "Original",
        "Fine-tuned(RE)",
        "SE",
        "LE",
        "GE",
        "GE + SE",
        "LE + SE",
        "GE + LE",
        "GE + LE + SE",
    ]
    cfgs = {v.row[1]: sw.variant_config(t11, v, 123, "/tmp/x") for v in t11.variants}
    assert not any(c.non_noisy for c in cfgs.values())  # Table 11 precedes the non-noisy loss (Table 13)
    assert (cfgs["GE + LE"].w_ge, cfgs["GE + LE"].w_le, cfgs["GE + LE"].w_se) == (1.0, 1.0, 0.0)
    assert cfgs["GE"].epochs == 30 and cfgs["GE"].image_size == 224 and cfgs["GE"].batch_size == 256
    t13 = sw.read_sweep("table13")
    nn = sw.variant_config(t13, t13.variant("Non-noisy CL + GE"), 123, "/tmp/x", nproc=4)
    assert (nn.non_noisy, nn.non_noisy_pool, nn.batch_size, nn.image_size) == (True, "local", 128, 384)
    t14 = sw.read_sweep("table14")
    c = sw.variant_config(t14, t14.variants[-1], 123, "/tmp/x")
    assert c.model == "/tmp/x/table13/groupvit_non_noisy_cl_ge/seed123/final.safetensors"
    assert (c.val_short_side, c.val_bg_thresh) == (512, {"coco_object": 0.99, "voc": 0.99})
    assert all(not v.train for v in t14.variants) and t14.variants[1].thesis == {"coco_object": 28.71, "voc": 53.41}
    t15 = sw.read_sweep("table15")
    three = sw.variant_config(t15, t15.variant("GroupViT 3 4"), 123, "/tmp/x")
    assert (three.n_grouping_blocks, three.final_group_tokens, three.trainable, three.epochs) == (3, 4, "all", 20)
    t7 = sw.read_sweep("table07")
    assert t7.variant("GroupViT 5 NP+Nouns + Caption").seeds == [0, 100, 200]


def test_bad_sweep_files_fail_naming_the_key(tmp_path):
    bad_row = dict(SWEEP, variants=[{"row": ["GroupViT", "GE"], "set": {"w_gee": 1.0}}])
    with pytest.raises(ConfigError, match="unknown GroupViT config key 'w_gee'"):
        sw.read_sweep(_write(tmp_path, bad_row, "a.yaml"))
    with pytest.raises(ConfigError, match="unknown key 'variantz'"):
        sw.read_sweep(_write(tmp_path, {**SWEEP, "variantz": []}, "b.yaml"))
    with pytest.raises(ConfigError, match="does not fill the label columns"):
        sw.read_sweep(_write(tmp_path, dict(SWEEP, variants=[{"row": ["GE"]}]), "c.yaml"))
    with pytest.raises(ConfigError, match="unknown dataset 'vocc'"):
        sw.read_sweep(_write(tmp_path, dict(SWEEP, datasets=["vocc"]), "d.yaml"))
    bad_value = dict(SWEEP, variants=[{"row": ["GroupViT", "GE"], "set": {"w_ge": "high"}}])
    s = sw.read_sweep(_write(tmp_path, bad_value, "e.yaml"))
    with pytest.raises(ConfigError, match="w_ge"):
        sw.variant_config(s, s.variants[0], 0, tmp_path)


def test_cli_parses_and_dry_runs(tmp_path, capsys):
    p = argparse.ArgumentParser()
    sc.add_cli(p.add_subparsers())
    args = p.parse_args(
        [
            "groupvit-sweep",
            str(_write(tmp_path)),
            "--dry-run",
            "--seeds",
            "0,1",
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert args.seeds == [0, 1] and args.func(args) == 0
    out = capsys.readouterr().out
    assert "[to run] GroupViT | LE seed 1" in out and "--nproc_per_node 2" in out and "Table 99" in out
    with pytest.raises(SystemExit, match="not found"):
        args.func(p.parse_args(["groupvit-sweep", "table99"]))


def test_fixture_runs_give_the_table_in_the_thesis_layout(tmp_path):
    """The real path offline: one training step, validated by the evaluator of groupvit-eval on the VOC and
    Pascal Context fixtures (official layouts), and the evaluation-only row; the table has the thesis's
    columns for both datasets with the published numbers beside ours, and every run's number is the one the
    evaluator gives for its saved model."""
    from nbsupport.analysis import segmentation_eval
    from nbsupport.analysis.zero_shot_protocol import EvalSettings
    from nbsupport.data.datasets import voc
    from nbsupport.data.datasets.registry import segmentation_dataset
    from nbsupport.models import groupvit as gv

    roots = voc.write_fixture(tmp_path / "fx")["root"]
    data = {
        "table": "F",
        "datasets": ["voc", "context"],
        "label_columns": ["Method"],
        "base": {
            "model": "random:small",
            "n_train": 8,
            "batch_size": 8,
            "image_size": 32,
            "epochs": 1,
            "context_length": 24,
            "val_short_side": 32,
            "val_window": 32,
            "val_stride": 16,
            "tagger": "lexicon",
            "threads": 1,
        },
        "seeds": [0],
        "variants": [
            {"row": ["Original"], "train": False, "thesis": {"voc": 52.29, "context": 22.39}},
            {"row": ["GE"], "set": {"w_ge": 1.0}, "thesis": {"voc": 50.16}},
        ],
    }
    out = tmp_path / "runs"
    over = [f"val_roots={{voc: {roots['voc']}, context: {roots['context']}}}"]
    text = sc.run_sweep(_write(tmp_path, data, "fx.yaml"), out, overrides=over, echo=lambda *a: None)
    ge = json.loads((out / "fx" / "ge" / "seed0" / "result.json").read_text())
    assert set(ge["miou"]) == {"voc", "context"} and ge["step"] == 1
    model = gv.load(str(out / "fx" / "ge" / "seed0" / "final.safetensors"))
    settings = EvalSettings(short_side=32, window=32, stride=16)
    want = segmentation_eval.validate(model, segmentation_dataset("voc", roots["voc"], "val"), settings=settings)
    assert ge["miou"]["voc"] == pytest.approx(want["miou"], abs=1e-6)
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "PVOC" in header and "(thesis)" in header and "PContext" in header
    assert f"| GE | {ge['miou']['voc']:.2f} | 50.16 |" in text
