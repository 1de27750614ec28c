"""Peer benchmark: one full GRPO step of megaent vs TRL's `GRPOTrainer` on the same work (CPU, fp32).

Workload (identical on both sides, built on the fly, nothing downloaded): a random Qwen2 policy (hidden 256,
4 layers, 8 heads, 2 KV heads, MLP 704, vocab 1001, tied embeddings) saved with a byte-level tokenizer to a
temp dir that both sides load; per step 8 prompts of 16 tokens x 8 samples x 64 new tokens (EOS never ends a
sample: megaent `rollout.ignore_eos`, TRL `min_new_tokens`), temperature 1, token-mean GRPO loss with
group-std advantages, one AdamW step (lr 1e-5, clip 1.0) per rollout, no KL, reward = fraction of characters
with an even code point in the decoded completion.

TRL loss: `loss_type="dapo"` = sum(per-token loss * mask) / (completion tokens of the whole generation batch),
i.e. the token mean over the batch (trl/trainer/grpo_trainer.py `_compute_loss`, TRL 1.16.0), which is
megaent's `loss_agg=token_mean`. With `num_iterations=1` TRL reuses the training forward's detached log-probs
as the old ones; megaent's on-policy path does the same (one update per rollout).

Each side runs in its own subprocess (same environment, `torch.set_num_threads(threads)`), N steps; the
first `--warmup` steps are excluded and the median of the rest is reported, split into generation (TRL: its
`_generate` call, timed by a wrapper; megaent: `time/rollout_s`) and update (step - generation).
Prints `name ours ref ratio` (ratio = TRL / megaent, > 1 means megaent is faster), then one JSON line.

Usage: python tools/bench_peer.py [--steps 6] [--warmup 1] [--threads 2] [--rounds 2] [--side both|megaent|trl]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS, G, PROMPT_LEN, NEW_TOKENS = 8, 8, 16, 64
LR, CLIP = 1e-5, 1.0


def make_policy_dir(out: Path) -> Path:
    """The shared HF checkpoint + tokenizer (tests/hf_tiny.py) at the workload's size."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_tiny import make_tiny_hf

    return make_tiny_hf(out, vocab_size=1001, hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704,
                        tie=True, weight_std=0.02, seed=0)


def prompt_texts(n: int, seed: int = 0) -> list[str]:
    """n printable ASCII strings of PROMPT_LEN characters (= PROMPT_LEN tokens of the byte-level tokenizer)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return ["".join(rng.choice(alphabet) for _ in range(PROMPT_LEN)) for _ in range(n)]


def reward_of(text: str) -> float:
    """Cheap deterministic reward of a decoded completion: fraction of characters with an even code point."""
    return sum(1 for c in text if ord(c) % 2 == 0) / max(len(text), 1)


# ------------------------------------------------------------------------------------------------ megaent side
@dataclass
class Prompt:
    """What the trainer reads of a prompt: token ids, text, reference answer."""

    ids: list[int]
    text: str
    answer: str


class _Prompts:
    """Prompt stream over `prompt_texts` with the `SyntheticPrompts` interface."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts, self.index = tokenizer, texts, 0

    def next_batch(self, n: int = PROMPTS):
        out = []
        for i in range(self.index, self.index + n):
            text = self.texts[i % len(self.texts)]
            out.append(Prompt(ids=list(self.tokenizer(text).input_ids), text=text, answer=""))
        self.index += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.index = int(sd["index"])


class _Scorer:
    def score(self, texts: list[str], answers: list[str]) -> tuple[list[float], int]:
        del answers
        return [reward_of(t) for t in texts], 0

    def take_metrics(self) -> dict[str, float]:
        return {}  # the trainer logs a scorer's timeouts / errors each step; this one has none

    def close(self) -> None:
        pass


def megaent_overrides(hf_dir: Path, run_dir: Path, steps: int, threads: int) -> list[str]:
    return [f"model.path={hf_dir}", f"trainer.run_dir={run_dir}", f"trainer.steps={steps}",
            f"trainer.threads={threads}", f"trainer.prompts_per_step={PROMPTS}", f"trainer.mini_batch_size={PROMPTS}",
            "trainer.ppo_epochs=1", "trainer.dynamics_every=0", "trainer.checkpoint_every=0",
            "trainer.samples_to_log=0", "trainer.quiet=true",
            # TRL forwards the step's 64 sequences as one batch (per_device_train_batch_size=64); so does megaent.
            f"trainer.max_tokens_per_micro_batch={PROMPTS * G * (PROMPT_LEN + NEW_TOKENS)}",
            f"rollout.n_samples={G}", f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0",
            "rollout.ignore_eos=true", "algorithm.policy_loss=ppo", "algorithm.loss_agg=token_mean",
            "algorithm.advantage=grpo", "algorithm.norm_adv_by_std=true", "algorithm.group_filter=false",
            f"optimizer.lr={LR}", f"optimizer.grad_clip={CLIP}", "optimizer.weight_decay=0.0"]


def run_megaent(hf_dir: Path, steps: int, threads: int) -> list[dict[str, float]]:
    import torch

    torch.set_num_threads(threads)
    from megaent.config import load_config
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.trainer.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="bench_peer_megaent_"))
    cfg = load_config(None, megaent_overrides(hf_dir, run_dir, steps, threads))
    state = init_parallel(1, 1)
    trainer = Trainer(cfg, run_dir=run_dir, state=state)
    trainer.prompts = _Prompts(trainer.tokenizer, prompt_texts(PROMPTS * steps))
    trainer.scorer = _Scorer()
    if getattr(trainer, "sink", None) is None:  # fit() opens it; the bench drives train_step directly
        from megaent.trainer.metrics import MetricsSink

        trainer.sink = MetricsSink(run_dir, enabled=True, wandb_project="", run_name=run_dir.name)
    out = []
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            m = trainer.train_step(step)
            step_s = time.perf_counter() - t0
            out.append({"step_s": step_s, "gen_s": m["time/rollout_s"], "update_s": step_s - m["time/rollout_s"],
                        "reward": m["reward/mean"], "resp_len": m["response/length_mean"]})
    finally:
        trainer.close()
        destroy_parallel()
    return out


# ------------------------------------------------------------------------------------------------ TRL side
def run_trl(hf_dir: Path, steps: int, threads: int) -> list[dict[str, float]]:
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def reward_func(completions, **kwargs):
        return [reward_of(c) for c in completions]

    out_dir = tempfile.mkdtemp(prefix="bench_peer_trl_")
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1000, disable_tqdm=True, seed=0, max_steps=steps,
        per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1, num_generations=G,
        num_iterations=1, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # block EOS: every completion is 64 tokens
        beta=0.0, loss_type="dapo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, optim="adamw_torch", adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, dataloader_num_workers=0, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    tok.padding_side = "left"
    data = Dataset.from_dict({"prompt": prompt_texts(PROMPTS * steps)})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=args, train_dataset=data,
                          processing_class=tok)

    gen_times: list[float] = []
    orig = trainer._generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            gen_times.append(time.perf_counter() - t0)

    trainer._generate = timed_generate
    rows: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()
            self.n_gen = len(gen_times)

        def on_step_end(self, *a, **kw):
            step_s = time.perf_counter() - self.t0
            gen = sum(gen_times[self.n_gen:])
            rows.append({"step_s": step_s, "gen_s": gen, "update_s": step_s - gen})

    trainer.add_callback(Timer())
    trainer.train()
    return rows


# ------------------------------------------------------------------------------------------------ driver
def _child(args: argparse.Namespace) -> None:
    fn = run_megaent if args.child == "megaent" else run_trl
    rows = fn(Path(args.hf_dir), args.steps, args.threads)
    print("BENCH_ROWS " + json.dumps(rows), flush=True)


def _spawn(side: str, hf_dir: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    cmd = [sys.executable, __file__, "--child", side, "--hf-dir", str(hf_dir), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROWS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH_ROWS "):])


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["both", "megaent", "trl"], default="both")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate the sides this many times (megaent, TRL, megaent, ...), each a fresh process "
                         "whose first --warmup steps are dropped; medians pool all rounds. Use 2-3 on a shared "
                         "machine so a load change hits both sides")
    ap.add_argument("--child", choices=["megaent", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        hf_dir = make_policy_dir(Path(tmp) / "policy")
        sides = ["megaent", "trl"] if args.side == "both" else [args.side]
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
        for _ in range(max(1, args.rounds)):
            for s in sides:
                rows[s] += _spawn(s, hf_dir, args)[args.warmup:]
    load = os.getloadavg()[0]
    res: dict[str, dict[str, float]] = {}
    for s, r in rows.items():
        res[s] = {k: _median(r, k) for k in ("step_s", "gen_s", "update_s")}
    print(f"{'name':<12}{'ours':>10}{'ref':>10}{'ratio':>8}")
    for k in ("step_s", "gen_s", "update_s"):
        ours, ref = res.get("megaent", {}).get(k, float("nan")), res.get("trl", {}).get(k, float("nan"))
        print(f"{k:<12}{ours:>10.3f}{ref:>10.3f}{ref / ours:>8.2f}")
    import trl

    summary = {"bench": "peer_grpo_step", "ours": "megaent", "ref": f"trl=={trl.__version__}",
               "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
               "load_1min": load,
               "workload": {"prompts": PROMPTS, "G": G, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                            "hidden": 256, "layers": 4, "vocab": 1001, "dtype": "float32"},
               **{f"{s}_{k}": v for s, d in res.items() for k, v in d.items()},
               "ratio": res.get("trl", {}).get("step_s", float("nan")) / res.get("megaent", {}).get("step_s",
                                                                                                 float("nan")),
               "raw": rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
