"""The experiment runner and its report: confidence intervals, Holm, the minimum detectable difference
and the label baselines against closed forms and hand-computed examples; the SIB-200 label scorer
against a full forward pass; the SIB-200 plan (learning-rate search on dev, then every seed on test);
and a smoke run of the offline demo setting (one seed, a few steps, every method) checked against the
runs' own logs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread
from scipy import stats

from experiments import report, run_all

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = {  # a SIB-200-shaped directory for the silhouette / LAPE callbacks (4 parallel sentences)
    "deu_Latn": ["Der Zug fährt um acht Uhr ab.", "Das Spiel endete unentschieden.", "Die Wahl findet im Mai statt.", "Der Arzt empfiehlt viel Wasser."],
    "rus_Cyrl": ["Поезд отправляется в восемь часов.", "Матч закончился вничью.", "Выборы пройдут в мае.", "Врач советует пить много воды."],
    "jpn_Jpan": ["列車は八時に出発します。", "試合は引き分けに終わった。", "選挙は五月に行われる。", "医者は水をたくさん飲むように勧める。"],
    "fra_Latn": ["Le train part à huit heures.", "Le match s'est terminé par un nul.", "L'élection a lieu en mai.", "Le médecin conseille de boire beaucoup d'eau."],
}


def test_confidence_interval_is_the_student_t_interval():
    # [1, 2, 3]: mean 2, sample sd 1, t(0.975, 2) = 4.302653 → half-width 4.302653 / √3 = 2.484138.
    mean, half = report.mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(2.4841377, abs=1e-6)
    # Five values with sd 0: no spread, zero width; one value: no interval at all.
    assert report.mean_ci([0.5] * 5) == (pytest.approx(0.5), pytest.approx(0.0))
    assert math.isnan(report.mean_ci([0.7])[1])
    assert report.cell([0.7]) == "0.700"
    assert report.cell([1.0, 2.0, 3.0]) == "2.000 ± 2.484"


def test_every_setting_plans_each_method_and_seed_once(tmp_path):
    parsed = run_all.parse_args(["--out", str(tmp_path), "--settings", "demo", "--seeds", "3", "4"])
    runs = run_all.plan(parsed)
    demo = run_all.settings(tmp_path)["demo"].methods
    assert sorted((r.method, r.seed) for r in runs) == sorted((m, s) for m in demo for s in (3, 4))
    assert len({r.directory for r in runs}) == len(runs)
    for run in runs:
        assert run.config["seed_everything"] == run.seed and run.config["data"]["seed"] == run.seed
        assert run.config["strategy"]["init_args"] == run_all.METHODS[run.method]


def _sib_like(directory: Path) -> Path:
    for language, sentences in SENTENCES.items():
        (directory / language).mkdir(parents=True)
        rows = ["index_id\tcategory\ttext"] + [f"{i}\ttravel\t{s}" for i, s in enumerate(sentences)]
        (directory / language / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return directory


def _printed_metric(log: str, tag: str) -> float:
    """The value Lightning's end-of-run summary printed for ``tag`` (stdout, not TensorBoard)."""
    return float(re.findall(rf"{re.escape(tag)}\s*│\s*([0-9.]+)", log)[-1])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_smoke_run_of_the_demo_setting(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "experiments.run_all", "--out", str(out), "--smoke", "--settings", "demo",
               "--sib200", str(_sib_like(tmp_path / "sib"))]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    runs = report.load_runs(out)
    assert sorted(r.method for r in runs) == sorted(run_all.settings(out)["demo"].methods)
    languages = ["deu", "rus", "jpn", "hin", "fra", "kor"]
    for run in runs:
        for language in languages:
            assert math.isfinite(run.last(f"val/bpb_{language}")), (run.method, language)
        # The report reads TensorBoard; the run's own printed summary must say the same.
        printed = _printed_metric((out / "runs" / "demo" / run.method / "seed0" / "log.txt").read_text(), "val/bpb_seen")
        assert run.last("val/bpb_seen") == pytest.approx(printed, abs=6e-5)
    by_method = {r.method: r for r in runs}
    # The two global modes are two implementations of the same update: same metrics.
    for language in languages:
        tag = f"val/bpb_{language}"
        assert by_method["global_mgda"].last(tag) == pytest.approx(by_method["global_two_pass_mgda"].last(tag), rel=1e-4)
    # MGDA's weights differ from Mean's uniform ones, so the trained models differ.
    assert by_method["bucket_mgda"].last("val/bpb_seen") != by_method["mean"].last("val/bpb_seen")

    results = (out / "results.md").read_text()
    for method in run_all.settings(out)["demo"].methods:
        assert report.METHOD_LABELS[method] in results
    mean_seen = f"| **seen** | {by_method['mean'].last('val/bpb_seen'):.3f} |"
    assert mean_seen in results
    assert "global_two_pass MGDA" in (out / "overhead.md").read_text()
    for name in ["bpb_per_language", "training_curves", "silhouette", "lape"]:
        image = imread(out / f"demo_{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0, name

    # Resumable: a second invocation finds every run done and reruns none of them.
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/log.txt")}
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(runs)} runs, {len(runs)} already done" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def _run(method, seed, seen, unseen):
    scalars = {"train/loss_deu": [(0, 1.0)], "val/bpb_deu": [(9, seen)], "val/bpb_fra": [(9, unseen)],
               "val/bpb_seen": [(9, seen)], "val/bpb_unseen": [(9, unseen)]}
    return report.RunLog("toy", method, seed, 1.0, [], scalars)


def test_tables_aggregate_over_seeds_and_pair_each_method_with_mean_on_its_seed():
    runs = [_run("mean", s, seen, 5.0) for s, seen in enumerate([1.0, 2.0, 3.0])]
    runs += [_run("bucket_mgda", s, seen, 4.0 + s) for s, seen in enumerate([1.5, 2.5, 3.5])]
    assert report.languages_of(runs, "bpb") == (["deu"], ["fra"])
    table = "\n".join(report.results_table(runs, "bpb"))
    assert "| **seen** | 2.000 ± 2.484 | 2.500 ± 2.484 |" in table  # t(0.975, 2)·1/√3 = 2.484
    assert "| fra (unseen) | 5.000 ± 0.000 | 5.000 ± 2.484 |" in table
    paired = "\n".join(report.paired_table(runs, "bpb"))
    # Per seed: 0.5, 0.5, 0.5 (seen) and -1, 0, 1 (unseen): the pairing removes the seed effect.
    assert "| seen | 0.5000 ± 0.0000 |" in paired
    assert "| unseen | 0.0000 ± 2.4841 |" in paired
    assert report.paired_table(runs, "acc") == []  # no accuracy logged: no table


# --------------------------------------------------------------------------------- SIB-200 study
LABELS = ["science/technology", "travel", "politics"]


def test_holm_is_the_step_down_procedure():
    # Holm (1979): sorted p = 0.005, 0.01, 0.03, 0.04 (m = 4) times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # each at least the one before: 0.02, 0.03, 0.06, 0.06; back in the given order:
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # An untested comparison (nan) stays nan and is not counted (m = 3): 0.02·3 = 0.06, 0.5·2 = 1.0,
    # 0.6·1 = 0.6 → kept at least 1.0; capped at 1.
    adjusted = report.holm([0.6, math.nan, 0.02, 0.5])
    assert math.isnan(adjusted[1]) and [adjusted[i] for i in (0, 2, 3)] == pytest.approx([1.0, 0.06, 1.0])


def test_minimum_detectable_difference_is_the_closed_form():
    # n = 5, sd 1: t(0.975, 4) = 2.776, t(0.80, 4) = 0.941 (Student t tables) → 3.717 / √5 = 1.6624.
    assert report.mdd(1.0, 5) == pytest.approx((2.776 + 0.941) / math.sqrt(5), abs=1e-3)
    # n = 10, sd 0.02: t(0.975, 9) = 2.262, t(0.80, 9) = 0.883 → 3.145 · 0.02 / √10.
    assert report.mdd(0.02, 10) == pytest.approx(3.145 * 0.02 / math.sqrt(10), abs=1e-4)
    assert report.mdd(2.0, 5) == pytest.approx(2 * report.mdd(1.0, 5))
    assert math.isnan(report.mdd(1.0, 1))


def test_label_baselines_from_the_counts():
    # Training prior 5:3:2 → 0.5, 0.3, 0.2; test labels 0, 1, 1, 2 → 0.25, 0.5, 0.25.
    base = report.label_baselines([5, 3, 2], [0, 1, 1, 2], [18, 6, 6, 8], LABELS)
    assert base["majority_label"] == "science/technology" and base["majority_acc"] == pytest.approx(0.25)
    assert base["best_constant_label"] == "travel" and base["best_constant_acc"] == pytest.approx(0.5)
    assert base["prior_acc"] == pytest.approx(0.5 * 0.25 + 0.3 * 0.5 + 0.2 * 0.25)
    bits = -math.log2(0.5) - 2 * math.log2(0.3) - math.log2(0.2)
    assert base["prior_bpb"] == pytest.approx(bits / (18 + 6 + 6 + 8))
    with pytest.raises(ValueError, match="need training label counts"):
        report.label_baselines([0, 0, 0], [0], [1], LABELS)


def test_accuracy_normalised_accuracy_and_bits_per_byte_from_label_scores():
    # Two sentences, 3 labels of 18, 6 and 8 bytes. Sentence 0 (true: 0): summed NLL picks label 1,
    # per byte picks label 0 (9/18 < 4/6). Sentence 1 (true: 2): both pick label 2.
    entry = {"kind": "seen", "label_index": [0, 2], "nll": [[9.0, 4.0, 7.0], [9.0, 8.0, 1.0]],
             "bytes": [[18, 6, 8], [18, 6, 8]]}
    m = report.language_metrics(entry)
    assert (m["n"], m["acc"], m["acc_norm"]) == (2, 0.5, 1.0)
    assert m["bpb"] == pytest.approx((9.0 + 1.0) / math.log(2) / (18 + 8))
    with pytest.raises(ValueError, match="malformed scores"):
        report.language_metrics({**entry, "bytes": [[18, 6]]})


def _scored(method, seed, acc_seen, bpb_seen, stage="test", lr=1e-4, unseen=True):
    """A run whose one seen language has 10 sentences of which round(10·acc) are right, and whose
    true-label NLL gives bits per byte ``bpb_seen`` (each label 10 bytes)."""
    right = round(10 * acc_seen)
    nll_true = bpb_seen * math.log(2) * 10
    nll = [[nll_true, nll_true + 1.0] if i < right else [nll_true, nll_true - 1.0] for i in range(10)]
    languages = {"eng_Latn": {"kind": "seen", "label_index": [0] * 10, "nll": nll, "bytes": [[10, 10]] * 10}}
    if unseen:
        languages["tel_Telu"] = {**languages["eng_Latn"], "kind": "unseen"}
    return report.ScoredRun(stage, method, seed, lr, 1.0, [], {"split": "test" if stage == "test" else "validation",
                                                               "labels": LABELS[:2], "languages": languages})


def test_paired_comparisons_are_paired_t_tests_with_holm_and_mdd():
    mean = [0.5, 0.6, 0.4, 0.5, 0.7]
    other = [0.6, 0.6, 0.6, 0.6, 0.9]  # differences 0.1, 0, 0.2, 0.1, 0.2
    runs = [_scored("mean", s, a, 1.0) for s, a in enumerate(mean)]
    runs += [_scored("bucket_mgda", s, a, 1.0 + 0.1 * s) for s, a in enumerate(other)]
    metrics = {(r.method, r.seed): report.run_metrics(r.scores) for r in runs}
    results = report.paired_comparisons(metrics, [("bucket_mgda", "mean")])
    assert [(r["metric"], r["group"]) for r in results] == report.OUTCOMES
    acc = results[0]
    diff = np.array([0.1, 0.0, 0.2, 0.1, 0.2])
    sd = diff.std(ddof=1)
    t = diff.mean() / (sd / math.sqrt(5))
    assert acc["mean"] == pytest.approx(0.12) and acc["sd"] == pytest.approx(sd)
    assert acc["p"] == pytest.approx(2 * (1 - stats.t.cdf(t, 4)))
    assert acc["mdd"] == pytest.approx(report.mdd(sd, 5)) and acc["better"] == 4
    # bits per byte 0, 0.1, ..., 0.4 higher than Mean's: lower is better, so "better" on no seed.
    bpb = next(r for r in results if (r["metric"], r["group"]) == ("bpb", "seen"))
    assert bpb["mean"] == pytest.approx(0.2) and bpb["better"] == 0
    assert [r["p_holm"] for r in results] == pytest.approx(report.holm([r["p"] for r in results]))


def test_learning_rates_are_chosen_on_dev_accuracy_then_bits_per_byte():
    grid = [_scored("mean", 100, 0.5, 1.0, "grid", 1e-4, False), _scored("mean", 100, 0.7, 1.2, "grid", 3e-4, False),
            _scored("bucket_mgda", 100, 0.6, 1.1, "grid", 1e-4, False), _scored("bucket_mgda", 100, 0.6, 0.9, "grid", 3e-4, False)]
    chosen = report.select_learning_rates(grid)
    assert chosen["mean"]["lr"] == 3e-4  # higher accuracy
    assert chosen["bucket_mgda"]["lr"] == 3e-4  # same accuracy, lower bits per byte
    assert chosen["mean"]["dev"]["0.0001"] == {"acc_seen": 0.5, "bpb_seen": pytest.approx(1.0)}
    assert report.select_learning_rates(grid, "bpb")["mean"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="no grid runs"):
        report.select_learning_rates([])


def test_sib200_report_writes_the_per_seed_csv_and_every_table(tmp_path):
    import csv
    import json

    for run in [_scored("base", 0, 0.3, 3.0)] + [_scored(m, s, 0.5 + 0.1 * (m == "bucket_mgda") + 0.01 * s, 1.0)
                                                for m in ("mean", "bucket_mgda", "global_mgda") for s in range(3)]:
        directory = run_all.sib200_run_dir(tmp_path, "test", run.method, None if run.method == "base" else run.lr, run.seed)
        directory.mkdir(parents=True)
        (directory / "scores_test.json").write_text(json.dumps(run.scores))
        (directory / "done.json").write_text(json.dumps({"stage": "test", "split": "test", "method": run.method,
                                                         "seed": run.seed, "lr": run.lr if run.method != "base" else None,
                                                         "seconds": 2.0, "command": []}))
    written = report.write(tmp_path)
    assert {p.name for p in written} == {report.SIB200_RESULTS, report.SIB200_PER_SEED, "sib200_acc_per_language.png"}
    rows = list(csv.DictReader(open(tmp_path / report.SIB200_PER_SEED)))
    assert len(rows) == 10 * 4  # 10 runs × (eng, tel, seen, unseen)
    mgda = next(r for r in rows if r["method"] == "bucket_mgda" and r["seed"] == "2" and r["language"] == "eng_Latn")
    assert float(mgda["acc"]) == pytest.approx(0.6) and float(mgda["bpb"]) == pytest.approx(1.0)
    text = (tmp_path / report.SIB200_RESULTS).read_text()
    assert "| bucket MGDA − global MGDA | accuracy, seen | 3 |" in text
    assert "MDD" in text and "p (Holm)" in text
    # 3 pairs × 4 outcomes are one Holm family.
    assert "over all 12 tests" in text


def _byte_encoder(max_length):
    from lightning_moo.data import Encoder
    from lightning_moo.hf import load_tokenizer

    return Encoder(load_tokenizer("bytes"), max_length=max_length, prompt_template="S: {text}\nT:",
                   response_template=" {category}", label_field="category", labels=LABELS)


def test_label_scores_equal_a_full_forward_of_every_choice():
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_moo.data import Row
    from lightning_moo.module import token_nll

    encoder = _byte_encoder(48)  # some rows longer: their prompts are cut, so prompt lengths vary in a batch
    rng = random.Random(0)
    rows = [Row({"text": "x" * rng.randint(1, 60), "category": rng.choice(LABELS)}, "f", f"f:{i}") for i in range(9)]
    examples, counts = encoder.encode(rows, with_choices=True)
    assert 0 < counts["truncated"] < len(rows)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(encoder.tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    scored = run_all.score_choices(model, examples, batch_size=4)
    for example, nlls in zip(examples, scored):
        full = [token_nll(model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels])).item()
                for ids, labels in example["choices"]]
        assert nlls == pytest.approx(full, abs=1e-4)
    no_prompt = {"choices": [([5, 6], [5, 6]), ([7, 6], [7, 6])]}
    with pytest.raises(ValueError, match="need a prompt"):
        run_all.score_choices(model, [no_prompt])


def _sib_splits(directory: Path, languages: list[str], rows: int = 8) -> Path:
    for j, language in enumerate(languages):
        (directory / language).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            lines = ["index_id\tcategory\ttext"] + [f"{i}\t{LABELS[i % 3]}\t{'w' * (i + j)} end" for i in range(rows)]
            (directory / language / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_data_summary_counts_labels_and_uncut_lengths(tmp_path):
    from lightning_moo.hf import load_tokenizer

    source = _sib_splits(tmp_path / "sib", ["aaa_Latn", "bbb_Latn"])
    options = {"train_languages": ["aaa_Latn"], "unseen_languages": ["bbb_Latn"], "source": str(source),
               "file_pattern": "{language}/{split}.tsv", "splits": {"validation": "dev"},
               "prompt_template": "S: {text}\nT:", "response_template": " {category}", "label_field": "category",
               "labels": LABELS, "max_length": 40}
    summary = run_all.data_summary(options, load_tokenizer("bytes"))
    assert summary["max_length"] == 40 and "train" not in summary["languages"]["bbb_Latn"]
    test = summary["languages"]["bbb_Latn"]["test"]
    assert test["rows"] == 8 and test["label_counts"] == [3, 3, 2]
    # Byte tokens: the prompt's bytes, the longest label's (" science/technology": 19) and EOS.
    lengths = [len(f"S: {'w' * (i + 1)} end\nT:".encode()) + 19 + 1 for i in range(8)]
    assert test["tokens_max"] == max(lengths) and test["tokens_median"] == np.median(lengths)
    assert test["truncated"] == {str(n): sum(x > n for x in lengths) for n in (40, 64, 160)}


def test_sib200_plan_searches_learning_rates_on_dev_then_runs_every_seed_on_test(tmp_path):
    sib = _sib_splits(tmp_path / "sib", ["eng_Latn"])
    args = run_all.parse_args(["--out", str(tmp_path / "out"), "--settings", "sib200", "--sib200", str(sib),
                               "--model", str(tmp_path / "model"), "--methods", "mean", "bucket_mgda"])
    setting = run_all.settings(sib)["sib200"]
    config = yaml.safe_load((ROOT / setting.config).read_text())["data"]
    assert len(args.seeds) >= 5
    grid = run_all.plan(args)
    assert sorted((r.method, r.meta["lr"]) for r in grid) == sorted((m, lr) for m in ("mean", "bucket_mgda")
                                                                     for lr in setting.lr_grid)
    for run in grid:
        assert run.seed == setting.grid_seed not in args.seeds and run.meta["split"] == "validation"
        scores = next(c for c in run.config["trainer"]["callbacks"] if c["class_path"].endswith("ChoiceScores"))
        assert scores["init_args"] == {"directory": str(run.directory), "splits": ["validation"],
                                       "languages": config["train_languages"]}
        assert run.config["model"]["lr"] == run.meta["lr"]
    final = run_all.plan(args, {"mean": 3e-4, "bucket_mgda": 1e-4})
    assert sorted((r.method, r.seed) for r in final) == [("base", 0)] + sorted(
        (m, s) for m in ("bucket_mgda", "mean") for s in args.seeds)
    for run in final:
        assert run.meta["split"] == "test" and run.config["model"].get("lr") == {"mean": 3e-4, "bucket_mgda": 1e-4}.get(run.method)
        assert run.config["data"]["splits"] == {"train": "train", "validation": "dev", "test": "test"}
        assert run.config["data"]["max_eval_examples"] is None  # the whole test split
        # One prompt everywhere: the runs keep the config's prompt, chat template and max_length.
        for key in ("prompt_template", "response_template", "chat_template", "max_length"):
            assert key not in run.config["data"]
    assert next(r for r in final if r.method == "base").config["trainer"]["max_steps"] == 0
    with pytest.raises(SystemExit, match="SIB-200 not found"):
        run_all.plan(run_all.parse_args(["--out", str(tmp_path), "--settings", "sib200", "--sib200", str(tmp_path / "none")]))
