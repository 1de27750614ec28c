"""The RL loop (DESIGN.md "Data flow of one RL step"), one linear method per phase.

    rollout -> rewards -> group filter -> advantages -> old log-probs (+ entropy, covariance metrics)
      -> ppo_epochs x mini-batch updates -> entropy-dynamics check -> weight sync -> metrics -> checkpoint

SPMD: every rank runs this same code. The prompt stream is deterministic and identical on all ranks, rollouts
return the same samples everywhere (see `rollout_phase`), rewards are scored on rank 0 and broadcast, and each
DP replica trains on its share of the GRPO groups. Randomness is explicit: sampling and Clip-Cov draw from
seeds derived from (trainer.seed, step, ...), so a resumed run continues exactly.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megaent.algorithms import compute_advantages
from megaent.config import Config, to_yaml
from megaent.parallel import ParallelState
from megaent.trainer import components
from megaent.trainer.batching import TrainSample, make_micro_batches, partition_groups
from megaent.trainer.checkpoint import latest_checkpoint, load_latest, save_checkpoint
from megaent.trainer.dynamics import EntropyDynamics
from megaent.trainer.guard import EXIT_DIVERGED, check_step
from megaent.trainer.metrics import MetricsSink, Progress
from megaent.trainer.rollout_phase import RolloutPhase
from megaent.trainer.signals import StopFlag
from megaent.trainer.state_dict import canonical_state, finish_load

if TYPE_CHECKING:
    from megaent.trainer.async_rollout import RolloutBatch

log = logging.getLogger(__name__)

EXIT_OK, EXIT_REQUEUE = 0, 3


class Trainer:
    def __init__(self, cfg: Config, *, run_dir: Path, state: ParallelState, stop: Optional[StopFlag] = None) -> None:
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        t = cfg.trainer
        if t.keep_freed_memory:
            from megaent.trainer.host import keep_freed_memory

            keep_freed_memory()
        torch.manual_seed(t.seed)
        self.hf_dir = components.prepare_policy_dir(cfg, run_dir=run_dir, state=state)
        self.tokenizer = components.load_tokenizer(self.hf_dir)
        self.policy = components.load_policy(cfg.model, self.hf_dir, state=state)  # megatron-core GPTModel
        self.engine = components.build_engine(self.policy, cfg.optimizer, state=state)  # its DDP + optimizer
        self.engine.head_chunk_size = t.head_chunk_size
        self.total_updates = t.steps * t.ppo_epochs * (t.prompts_per_step // t.mini_batch_size)
        self.prompts = components.build_prompts(cfg.data, self.tokenizer, seed=t.seed, batch_size=t.prompts_per_step)
        self.scorer = components.build_scorer(cfg.reward, cfg.data) if state.rank == 0 else None
        self.rollout = RolloutPhase(cfg.rollout, policy=self.policy, state=state, hf_dir=str(self.hf_dir),
                                    run_dir=run_dir, eos_token_ids=components.eos_ids(self.tokenizer, self.hf_dir),
                                    seed=t.seed)
        self.dynamics = EntropyDynamics()
        self.controller = components.build_entropy_controller(cfg)  # None unless algorithm.target_entropy is set
        self.sink: Optional[MetricsSink] = None  # opened in fit(), after a resume has truncated the files
        self.prefetch = None  # rollout.async_steps: rank 0's producer of the next step's batch
        if cfg.rollout.async_steps:
            from megaent.trainer.async_rollout import Prefetcher

            self.prefetch = Prefetcher(lambda step: self.gather(step, local=True), rank=state.rank,
                                       world_size=state.world_size)
        self.stop = stop or StopFlag().install()

    # ------------------------------------------------------------------ loop
    def fit(self) -> int:
        t = self.cfg.trainer
        start = self.restore()
        self.sink = MetricsSink(self.run_dir, enabled=self.state.rank == 0, start_step=start,
                                wandb_project=t.wandb_project, run_name=self.run_dir.name)
        progress = Progress(t.steps, start, enabled=self.state.rank == 0, quiet=t.quiet)
        try:
            for step in range(start + 1, t.steps + 1):
                metrics = self.train_step(step)
                self.sink.log(step, metrics)
                progress.update(step, metrics)
                diverged = check_step(step, metrics, self.policy.named_parameters(), device=self.state.device,
                                      run_dir=self.run_dir)
                if diverged:  # before any checkpoint or export is written from this step
                    log.error("%s", diverged)
                    return EXIT_DIVERGED
                stop = self.stop.should_stop()
                if stop or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    self.save(step)
                if t.export_hf_every and step % t.export_hf_every == 0:
                    components.export_hf(self.policy, self.state, self.run_dir / f"hf_step_{step:06d}")
                if stop:
                    log.info("stop requested (signal %s): checkpointed step %d, exiting for requeue",
                             self.stop.signum, step)
                    return EXIT_REQUEUE
            components.export_hf(self.policy, self.state, self.run_dir / "hf_final")
            return EXIT_OK
        finally:
            progress.close()

    def close(self) -> None:
        self.stop.uninstall()
        if self.prefetch is not None:
            self.prefetch.close()
        self.rollout.close()
        if self.sink is not None:
            self.sink.close()
        if self.scorer is not None:
            self.scorer.close()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.monotonic()
        if self.prefetch is not None:  # rollout.async_steps: made during the last update (or now, at the start)
            batch = self.prefetch.take(step)
            if batch.prompt_state is not None:
                self.prompts.load_state_dict(batch.prompt_state)  # rank 0's thread drew the prompts
            if step < self.cfg.trainer.steps:
                self.prefetch.start(step + 1)  # sampled from the weights served now, while this step updates
        else:
            batch = self.gather(step, local=False)
        samples, roll = self.finish_batch(step, batch)
        t_roll = time.monotonic() - t0
        mine = partition_groups(samples, self.state.dp)[self.state.dp_rank]
        metrics = dict(roll)
        self.rollout.release()  # rollout.colocate: the servers' memory is the update's until the sync
        metrics.update(self.update(step, mine))
        t_train = time.monotonic() - t0 - t_roll
        if self.prefetch is not None:
            self.prefetch.wait()  # the next batch is all from the old weights
        t_wait = time.monotonic() - t0 - t_roll - t_train
        route = self.rollout.sync(step=step)
        step_s = time.monotonic() - t0
        tokens = sum(len(s) for s in samples)
        metrics.update({"time/rollout_s": t_roll, "time/train_s": t_train, "time/step_s": step_s,
                        "time/rollout_gen_s": batch.gen_s, "time/prefetch_wait_s": t_wait,
                        "tokens_per_s": tokens / max(step_s, 1e-9), "rollout/sync_shared": float(route == "shared")})
        if self.state.rank == 0:
            metrics.update(batch.scorer_metrics)  # verifier timeouts, errors, crashes of this batch
            self.sink.log_samples(step, batch.texts)
        return metrics

    def gather(self, step: int, *, local: bool) -> "RolloutBatch":
        """Rollouts + rewards + group filter of step `step`, on every rank (collective), or with `local` on rank 0
        alone (the async producer thread: the servers' client and the scorer, no process group).

        Group filter (DAPO dynamic sampling, `megaent.data.group_filter.fill_batch`): each round rolls out a
        full batch of fresh prompts and keeps the groups whose rewards differ, until prompts_per_step groups
        are kept or algorithm.group_filter_max_tries rounds are spent.
        """
        from megaent.data.group_filter import fill_batch
        from megaent.trainer.async_rollout import RolloutBatch

        a, t, G = self.cfg.algorithm, self.cfg.trainer, self.cfg.rollout.n_samples
        t0, version = time.monotonic(), self.rollout.version
        seen: dict[str, list] = {"rewards": [], "lengths": [], "texts": [], "timeouts": [0]}

        def sample_more(missing: int, round_: int) -> tuple[list, list[list[float]]]:
            prompts = self.prompts.next_batch()
            ids = [list(p.ids) for p in prompts]
            if local:
                groups = self.rollout.generate_here(ids, step=step, round_=round_)
                rewards, timeouts = self.score_here(prompts, groups)
            else:
                groups = self.rollout.generate(ids, step=step, round_=round_)
                rewards, timeouts = self.score(prompts, groups)
            seen["timeouts"][0] += timeouts
            for p, g, r in zip(prompts, groups, rewards):
                seen["rewards"].extend(r)
                seen["lengths"].extend(len(s.output_ids) for s in g)
                if self.state.rank == 0 and len(seen["texts"]) < t.samples_to_log:
                    seen["texts"].append({"prompt": p.text, "response": self.tokenizer.decode(g[0].output_ids),
                                          "reward": r[0], "answer": p.answer})
            return list(zip(prompts, groups, rewards)), rewards

        res = fill_batch(sample_more, target=t.prompts_per_step, max_tries=a.group_filter_max_tries if a.group_filter
                         else 1, drop_uninformative=a.group_filter and G > 1)  # one sample: nothing to compare
        for _, g, _ in res.groups:
            for s in g:
                s.meta["weight_version"] = version
        return RolloutBatch(step=step, fill=res, rewards=seen["rewards"], lengths=seen["lengths"], texts=seen["texts"],
                            timeouts=seen["timeouts"][0], version=version, gen_s=time.monotonic() - t0,
                            scorer_metrics=self.scorer.take_metrics() if self.scorer is not None else {},
                            prompt_state=self.prompts.state_dict() if local else None)

    def finish_batch(self, step: int, batch: "RolloutBatch") -> tuple[list[TrainSample], dict[str, float]]:
        """Advantages -> (TrainSamples identical on every rank, rollout metrics); keeps the sampler's log-probs."""
        a, t, G = self.cfg.algorithm, self.cfg.trainer, self.cfg.rollout.n_samples
        res = batch.fill
        self._rollout_lps = {}
        if not res.full:
            log.warning("step %d: group filter kept %d/%d groups after %d rounds; training on what was kept",
                        step, len(res.groups), t.prompts_per_step, res.rounds)
        samples: list[TrainSample] = []
        if res.groups:
            rewards = [list(r) for _, _, r in res.groups]
            adv = compute_advantages(torch.tensor(rewards, dtype=torch.float32, device="cpu"), estimator=a.advantage,
                                     norm_by_std=a.norm_adv_by_std)  # [N, G]
            for gi, (_, g, _) in enumerate(res.groups):
                for j, s in enumerate(g):
                    uid = gi * G + j
                    samples.append(TrainSample(tokens=torch.tensor(list(s.prompt_ids) + list(s.output_ids), device="cpu"),
                                               prompt_len=len(s.prompt_ids), advantage=float(adv[gi, j]),
                                               group=gi, uid=uid))
                    self._rollout_lps[uid] = s.logprobs
        r = torch.tensor(batch.rewards or [0.0], device="cpu")
        lengths = batch.lengths
        metrics = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
                   "response/length_mean": float(sum(lengths) / max(len(lengths), 1)),
                   "response/length_max": float(max(lengths, default=0)),
                   "reward/timeouts": float(batch.timeouts), **res.metrics(),
                   "rollout/staleness": float(step - 1 - batch.version)}  # policy updates sampler -> learner
        return samples, metrics

    def score(self, prompts: list[Any], groups: list[list[Any]]) -> tuple[list[list[float]], int]:
        """Rank 0 verifies every response; the rewards are broadcast (1 broadcast_object_list)."""
        out: list[Any] = [None]
        if self.state.rank == 0:
            out[0] = self.score_here(prompts, groups)
        if self.state.world_size > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]

    def score_here(self, prompts: list[Any], groups: list[list[Any]]) -> tuple[list[list[float]], int]:
        """Rank 0: (rewards per group, verifier timeouts); no collective."""
        texts = [self.tokenizer.decode(s.output_ids, skip_special_tokens=True) for g in groups for s in g]
        answers = [p.answer for p, g in zip(prompts, groups) for _ in g]
        flat, timeouts = self.scorer.score(texts, answers)
        it = iter(flat)
        return [[next(it) for _ in g] for g in groups], timeouts

    def _micro_batches(self, samples: list[TrainSample]) -> list:
        """Token-balanced THD micro-batches of `samples` on the policy's device (equal count over DP)."""
        st, t = self.state, self.cfg.trainer
        multiple = st.tp if self.policy.config.sequence_parallel else 1
        mbs = make_micro_batches(samples, max_tokens=t.max_tokens_per_micro_batch, dp_group=st.dp_group,
                                 share_prefix=False, multiple=multiple, device=st.device)
        return [mb.to(st.device) for mb in mbs]

    def _lr(self) -> float:
        from megaent.trainer.mcore_engine import lr_at

        o = self.cfg.optimizer
        return lr_at(self.engine.step_count, lr=o.lr, warmup_steps=o.warmup_steps, schedule=o.schedule,
                     min_lr_ratio=o.min_lr_ratio, total_steps=self.total_updates)

    def update(self, step: int, mine: list[TrainSample]) -> dict[str, float]:
        """Old log-probs + batch metrics, then ppo_epochs x mini-batch updates; returns step metrics."""
        from megaent.trainer.update import batch_metrics, compute_logprobs, logprobs_by_uid, train_mini_batch

        cfg, st, t = self.cfg, self.state, self.cfg.trainer
        temp = cfg.rollout.temperature
        loss_cfg = components.controlled_loss(cfg.algorithm, self.controller)  # this step's k / r
        # rollout.async_old_logprobs=behaviour: the sampler's log-probs are the old ones (trainer/async_rollout.py)
        behaviour = cfg.rollout.async_steps > 0 and cfg.rollout.async_old_logprobs == "behaviour"
        if behaviour:
            for s in mine:
                s.old_logprobs = torch.tensor(self._rollout_lps[s.uid], dtype=torch.float32, device="cpu")
        mbs = self._micro_batches(mine)
        n_mini = t.prompts_per_step // t.mini_batch_size
        update_stats: list[dict[str, float]] = []
        probe = None
        if t.dynamics_every and step % t.dynamics_every == 0 and t.dynamics_budget > 0:
            from megaent.trainer.entropy_probe import EntropyProbe

            probe = EntropyProbe(self.policy, st, mbs, budget=t.dynamics_budget, temperature=temp,
                                 seed=components.derive_seed(t.seed, step, st.dp_rank, 7))
        hook = (lambda which: probe.hook(which)) if probe is not None else (lambda which: None)  # noqa: E731
        # One PPO update per rollout: the training forward's detached log-probs are the old ones (no extra pass).
        on_policy = not behaviour and t.ppo_epochs == 1 and n_mini == 1 and cfg.algorithm.policy_loss == "ppo"
        if on_policy:
            gen = torch.Generator().manual_seed(components.derive_seed(t.seed, step, 0, 0))
            update_stats.append(train_mini_batch(self.engine, mbs, loss_cfg=loss_cfg, state=st, generator=gen,
                                                 temperature=temp, old_from_current=True, lr=self._lr(),
                                                 on_hidden=hook("old")))
            old = logprobs_by_uid(mbs, samples=mine)
        else:
            old = compute_logprobs(self.engine, mbs, state=st, temperature=temp, fill_old=not behaviour,
                                   samples=mine, on_hidden=hook("old"))
        before = batch_metrics(mbs, state=st)
        metrics = dict(before)
        metrics.update(self._consistency(old))
        for epoch in range(0 if on_policy else t.ppo_epochs):
            for k in range(n_mini):
                chunk = self._mini_batch(mine, k, n_mini)
                mb = self._micro_batches(chunk)
                gen = torch.Generator().manual_seed(components.derive_seed(t.seed, step, epoch, k))
                update_stats.append(train_mini_batch(self.engine, mb, loss_cfg=loss_cfg, state=st,
                                                     generator=gen, temperature=temp, lr=self._lr()))
        for key in update_stats[0] if update_stats else []:
            vals = [u[key] for u in update_stats if u.get(key) is not None]
            if vals:
                metrics[key] = sum(vals) / len(vals)
        if cfg.algorithm.policy_loss != "ppo" and "actor/selected_frac" in metrics:
            metrics[f"{cfg.algorithm.policy_loss}/selected_frac"] = metrics["actor/selected_frac"]
        if update_stats:  # grad_norm etc. are means over the step's updates; lr is the last one used
            metrics["lr"] = update_stats[-1]["lr"]
            metrics["optimizer/updates"] = float(len(update_stats))
        if t.dynamics_every and step % t.dynamics_every == 0:
            t_fwd = time.monotonic()
            compute_logprobs(self.engine, mbs, state=st, temperature=temp, fill_old=False, samples=mine,
                             on_hidden=hook("new"))
            after = batch_metrics(mbs, state=st)
            metrics["time/dynamics_forward_s"] = time.monotonic() - t_fwd  # the after-update forward
            metrics.update(self.dynamics.observe(before, after, lr=metrics.get("lr", cfg.optimizer.lr)))
            if probe is not None:
                exact = probe.result()
                metrics.update(self.dynamics.observe_exact(exact["pred_dH"], exact["dH"], second=exact["exact_second"]))
                metrics.update({"dynamics/exact_second": exact["exact_second"],
                                "time/probe_s": exact["probe_time_s"]})
        if self.controller is not None:  # validate() guarantees the probe ran this step
            metrics[f"controller/{self.controller.knob}_used"] = self.controller.ratio
            signal = cfg.algorithm.entropy_controller_signal
            dH = {"measured": metrics["dynamics/exact_dH"], "first_order": metrics["dynamics/exact_pred_dH"],
                  "second_order": metrics["dynamics/exact_pred_dH"] + metrics["dynamics/exact_second"]}[signal]
            metrics.update(self.controller.update(step=step, entropy=before["entropy/mean"], pred_dH=dH))
        return metrics

    def _consistency(self, old: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """|trainer log-prob - rollout log-prob| on the same tokens, over all DP ranks (near 0 when embedded)."""
        dev = self.state.device
        diffs = [(lp - torch.tensor(self._rollout_lps[uid], dtype=torch.float32, device=dev)).abs()
                 for uid, (lp, _) in old.items() if uid in self._rollout_lps]
        d = torch.cat(diffs) if diffs else torch.zeros(0, device=dev)
        sums = torch.stack([d.sum(), torch.tensor(float(d.numel()), device=dev)])
        peak = d.max() if d.numel() else torch.zeros((), device=dev)
        if self.state.dp > 1:
            dist.all_reduce(sums, group=self.state.dp_group)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.state.dp_group)
        return {"rollout/logprob_diff_mean": float(sums[0] / sums[1].clamp(min=1)),
                "rollout/logprob_diff_max": float(peak)}

    @staticmethod
    def _mini_batch(mine: list[TrainSample], k: int, n_mini: int) -> list[TrainSample]:
        """The k-th of n_mini mini-batches of this rank's share, GRPO groups whole."""
        gids = sorted({s.group for s in mine})
        lo, hi = len(gids) * k // n_mini, len(gids) * (k + 1) // n_mini
        keep = set(gids[lo:hi])
        return [s for s in mine if s.group in keep]

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict[str, int]:
        return {"tp": self.state.tp, "pp": self.state.pp, "dp": self.state.dp}

    def _meta(self) -> dict[str, Any]:
        return {"data": self.prompts.state_dict(), "optimizer_steps": self.engine.step_count,
                "config": to_yaml(self.cfg),
                "layout": self._layout(),
                "hf_dir": str(self.hf_dir), "dynamics": self.dynamics.state_dict(),
                **({"rollout_prefetch": b.to_json()} if (b := self._prefetched()) is not None else {}),
                **({"controller": self.controller.state_dict()} if self.controller is not None else {})}

    def _prefetched(self) -> Any:
        """Rank 0, rollout.async_steps: the next step's batch, complete (the sync waited for it), or None."""
        return self.prefetch.done_batch() if self.prefetch is not None else None

    def save(self, step: int) -> None:
        tensors = canonical_state(self.policy, self.engine, self.state, loading=False)
        save_checkpoint(self.run_dir, step, tensors, self._meta(), rank=self.state.rank,
                        keep_last=self.cfg.trainer.keep_last)

    def restore(self) -> int:
        """Resume from the latest complete checkpoint of the run directory; returns its step (0 = fresh)."""
        if latest_checkpoint(self.run_dir) is None:
            return 0
        tensors = canonical_state(self.policy, self.engine, self.state, loading=True)
        # The newest intact checkpoint (digests checked; a damaged one falls back with a warning).
        path, meta = load_latest(self.run_dir, tensors, rank=self.state.rank, layout=self._layout(),
                                 verify_digests=self.cfg.trainer.verify_checkpoints)
        finish_load(self.policy, self.engine, tensors, step=int(meta["optimizer_steps"]))
        self.prompts.load_state_dict(meta["data"])
        self.dynamics.load_state_dict(meta.get("dynamics", {}))
        if self.controller is not None and "controller" in meta:  # a run that had no controller starts it fresh
            self.controller.load_state_dict(meta["controller"])
        step = int(meta["step"])
        if self.prefetch is not None and "rollout_prefetch" in meta:  # sampled before the checkpoint's weights
            from megaent.trainer.async_rollout import RolloutBatch

            self.prefetch.put(RolloutBatch.from_json(meta["rollout_prefetch"]))
        self.rollout.sync(step=step)
        log.info("resumed from %s (step %d)", path, step)
        return step
