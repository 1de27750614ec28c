"""The one configuration schema of megaent.

Every default lives here and only here; YAML files under configs/ override,
never restate. Each field carries a one-line docstring (the string literal
under it), which `megaent train --help-config` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    path: str = ""
    """HuggingFace checkpoint directory (Qwen2 or Llama family); empty = the demo builds its own tiny policy."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the policy (fp32 master weights are kept for bf16 on GPU)."""
    backend: Literal["local", "te"] = "local"
    """Linear-layer backend: megatron-core local TP layers, or Transformer Engine (GPU)."""
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    """Compute precision of the update; fp8 needs Transformer Engine or torchao on a GPU."""
    fp8_recipe: Literal["delayed", "current", "mxfp8"] = "delayed"
    """FP8 scaling recipe (Transformer Engine; torchao always uses current scaling; mxfp8 needs Blackwell)."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute in backward to save memory: selective = core attention only, full = whole decoder layers."""
    apex: Literal["auto", "off"] = "auto"
    """auto: NVIDIA apex fused RMSNorm (local backend) when apex imports on CUDA; off: never."""
    compile: bool = False
    """torch.compile each decoder layer (local backend)."""
    pipeline_layers: Optional[list[int]] = None
    """Decoder layers per pipeline stage (must sum to the layer count); None = even split."""
    demo_warmup_steps: int = 500
    """Supervised warm-up steps of the demo's tiny policy (only when `path` is empty)."""
    attn_implementation: Literal["sdpa"] = "sdpa"
    """Attention kernel: torch scaled_dot_product_attention."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pp: int = 1
    """Pipeline-parallel size (splits decoder layers into stages)."""
    ep: int = 1
    """Expert-parallel size for MoE checkpoints (splits the experts over ep ranks of each DP group); must divide
    the expert count and the data-parallel size world / (tp * pp)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = NCCL when CUDA is available, else gloo."""
    timeout_s: int = 1800
    """Collective timeout in seconds."""


@dataclass
class DataConfig:
    path: str = ""
    """Prompt file (.jsonl or .parquet); empty = the synthetic task named by `task`."""
    task: str = "arith"
    """Synthetic task for the demo when `path` is empty."""
    task_max_digits: int = 2
    """Synthetic arith task: longest operand length in digits (1 = the 100 single-digit sums)."""
    prompt_key: str = "prompt"
    """Field holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Field holding the ground-truth answer."""
    max_prompt_len: int = 512
    """Prompts longer than this many tokens are filtered out."""
    apply_chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template."""
    shuffle: bool = True
    """Shuffle deterministically from trainer.seed (the position is saved for exact resume)."""


@dataclass
class RewardConfig:
    kind: Literal["math", "synthetic"] = "synthetic"
    """Verifier: math-verify on the final answer, or the synthetic task's exact checker."""
    timeout_s: float = 5.0
    """Per-sample verification timeout; a timeout scores 0 and is counted."""
    workers: int = 2
    """Verifier process-pool size; 0 = in-process for the synthetic checker (math still gets one process, since
    only a process can be stopped at its deadline)."""
    worker_memory_gib: float = 4.0
    """Address-space cap of each verifier process (RLIMIT_AS); a sample past it scores 0 and counts as an error."""
    format_reward: float = 0.0
    """Reward added when the answer is in the expected format (0 = off)."""


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "http", "sglang"] = "embedded"
    """Where rollouts come from: in-process engine, `megaent serve`/SGLang URLs, or SGLang servers launched by megaent."""
    urls: list[str] = field(default_factory=list)
    """Server base URLs for engine=http (e.g. http://127.0.0.1:30000)."""
    n_samples: int = 8
    """Samples per prompt (the GRPO group size G)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer applies the same temperature to its log-probs."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    max_new_tokens: int = 64
    """Maximum response length in tokens."""
    ignore_eos: bool = False
    """Sample every response to max_new_tokens: EOS does not stop a sample (benchmarks with equal lengths)."""
    request_timeout_s: float = 600.0
    """HTTP timeout of one generate request."""
    weight_sync: Literal["disk", "distributed", "nccl"] = "disk"
    """How updated weights reach rollout servers: disk (save_hf + /update_weights_from_disk) or distributed
    (SGLang's /update_weights_from_distributed over a process group, NCCL on GPUs, gloo on CPU; no file);
    "nccl" is an alias of distributed."""
    sglang_mem_fraction: float = 0.8
    """--mem-fraction-static for launched SGLang servers."""
    sglang_tp: int = 1
    """Tensor-parallel size of each launched SGLang server."""
    colocate: bool = False
    """Rollout servers share the training GPUs: the trainer asks them to free their memory before each update
    (/release_memory_occupation) and resumes it around the weight sync (weights, sync, KV cache)."""
    async_steps: int = 0
    """Generation runs this many steps ahead of the update (0 = synchronous, 1 = step k+1's rollouts are sampled
    from the weights before step k's update while it runs)."""
    async_old_logprobs: Literal["behaviour", "recompute"] = "behaviour"
    """With async_steps: the PPO ratio's old log-probs are the sampler's (behaviour: the ratio sees and clips the
    one-update staleness) or the learner's own before this step's update (recompute: as in a synchronous step)."""


@dataclass
class LossConfig:
    """Fields read by `megaent.algorithms.policy_loss`."""

    policy_loss: Literal["ppo", "clip_cov", "kl_cov"] = "ppo"
    """Policy objective: PPO clipped surrogate, Clip-Cov, or KL-Cov (Cui et al. 2025)."""
    clip_ratio_low: float = 0.2
    """PPO lower clip: ratio >= 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.2
    """PPO upper clip: ratio <= 1 + clip_ratio_high (clip-higher uses 0.28)."""
    dual_clip_c: Optional[float] = None
    """Dual-clip bound for negative advantages (e.g. 3.0); None = off."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction r of valid tokens whose gradient is detached."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound w_low (strict)."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound w_high (strict)."""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: top fraction k of tokens by covariance that get the |log-ratio| penalty (2e-4 for 32B)."""
    kl_cov_coef: float = 1.0
    """KL-Cov: penalty coefficient beta."""
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    """How per-token losses are aggregated; denominators are global over the mini-batch."""
    cov_scope: Literal["global", "micro_batch"] = "global"
    """Covariance and selection over the whole mini-batch on all ranks, or per micro-batch (older behaviour)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off, as in the paper)."""
    kl_coef: float = 0.0
    """KL-to-reference coefficient (0 = off, as in the paper; no reference model is kept)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator: k1 = log-ratio, k3 = low-variance estimator."""


@dataclass
class AlgorithmConfig(LossConfig):
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage estimator over the G samples of each prompt."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std."""
    group_filter: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more."""
    group_filter_max_tries: int = 4
    """Rollout rounds allowed to fill a filtered batch."""
    target_entropy: Optional[float] = None
    """Entropy controller (`megaent.algorithms.entropy_controller`): target token-mean entropy in nats; each step
    it sets KL-Cov's kl_cov_ratio or Clip-Cov's clip_cov_ratio (the starting value) from the probe's entropy
    change (entropy_controller_signal). Needs policy_loss kl_cov/clip_cov and trainer.dynamics_every=1;
    null = off (fixed ratio)."""
    entropy_controller_signal: Literal["measured", "second_order", "first_order"] = "measured"
    """Which entropy change of the step the controller reads, all on the probe's positions: the measured one
    (H_new - H_old, exact), or the prediction -Cov(log pi, dz) to first order / plus the second-order term.
    The predictions hold for small steps only: on the CPU demo (8 Adam steps of lr 2e-4 per RL step) the
    first-order sign agreed on about half the late steps and steered the ratio the wrong way."""
    target_entropy_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Target over the run: constant, or from target_entropy at step 1 to target_entropy_final at trainer.steps."""
    target_entropy_final: Optional[float] = None
    """Target at the last step for a linear/cosine schedule (nats); null = target_entropy throughout."""
    entropy_controller_ratio_min: float = 1e-5
    """Entropy controller: smallest ratio (k or r) it may set."""
    entropy_controller_ratio_max: float = 0.1
    """Entropy controller: largest ratio (k or r) it may set."""
    entropy_controller_ki: float = 1.0
    """Entropy controller: gain on the relative error of the forecast entropy (log-ratio per unit error)."""
    entropy_controller_kp: float = 5.0
    """Entropy controller: gain on the relative rate error (target change - predicted dH) / target."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip over all ranks (0 = off)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    distributed_optimizer: Optional[bool] = None
    """megatron-core's distributed optimizer (fp32 main parameters and Adam state sharded over data-parallel
    ranks, gradients reduce-scattered); None = on when DP > 1. Checkpoints stay layout-independent."""


@dataclass
class TrainerConfig:
    steps: int = 100
    """RL steps (one rollout batch each)."""
    seed: int = 0
    """Seed of every random choice (sampling, data order, Clip-Cov selection)."""
    run_dir: str = ""
    """Run directory; empty = runs/<config name>-<time>."""
    prompts_per_step: int = 16
    """Prompts per rollout batch (each sampled rollout.n_samples times)."""
    mini_batch_size: int = 16
    """Prompts per optimizer update; prompts_per_step / mini_batch_size updates per epoch."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    max_tokens_per_micro_batch: int = 4096
    """Token budget of one micro-batch (token-balanced packing)."""
    share_prompt_prefix: bool = False
    """Forward each GRPO group's prompt once per micro-batch, its samples attending to it (same gradient).
    Not yet on the megatron-core engine (its packed THD attention has no shared-prefix layout): must be false."""
    head_chunk_size: int = 4096
    """Vocab columns per chunk of the fused LM head in every log-prob pass (old, selection, update); its extra
    memory is about tokens x chunk x 16 bytes (`megaent plan` counts it)."""
    checkpoint_every: int = 10
    """Steps between checkpoints (0 = only at the end and on signals)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    verify_checkpoints: bool = True
    """Check every checkpoint file's SHA-256 digest before a resume loads it (false = skip, for speed)."""
    dynamics_every: int = 1
    """Steps between entropy-dynamics diagnostics (predicted vs measured entropy change; 0 = off)."""
    dynamics_budget: int = 4096
    """Response positions per step and DP rank of the exact entropy-change probe (-Cov(log pi, dz) of the update
    vs the measured dH on the same positions, `dynamics/exact_*`); 0 = off."""
    samples_to_log: int = 4
    """Generations written to samples.jsonl per step."""
    quiet: bool = False
    """No progress bar (batch jobs); metrics still go to metrics.jsonl."""
    wandb_project: str = ""
    """Weights & Biases project (empty = off)."""
    export_hf_every: int = 0
    """Steps between HuggingFace exports (0 = only at the end)."""
    threads: int = 0
    """torch intra-op threads per rank (0 = torch's default / OMP_NUM_THREADS); tiny CPU models run best on 1."""
    keep_freed_memory: bool = True
    """Linux/glibc: serve tensors up to 32 MiB from the heap and keep freed memory for the next step instead of
    returning it to the kernel (megaent.trainer.host): no page faults on recurring buffers; off = glibc default."""


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Training nodes."""
    gpus_per_node: int = 8
    """GPUs (tasks) per training node; 0 = CPU tasks."""
    tasks_per_node: int = 0
    """Tasks per node when gpus_per_node = 0 (CPU runs)."""
    rollout_nodes: int = 0
    """Extra nodes that run SGLang rollout servers."""
    partition: str = ""
    """Slurm partition (empty = cluster default)."""
    account: str = ""
    """Slurm account (empty = none)."""
    time: str = "24:00:00"
    """Wall-time limit (minutes, HH:MM:SS or D-HH:MM:SS); quote it in YAML, where 24:00:00 unquoted is 86400."""
    job_name: str = "megaent"
    """Job name."""
    signal_before_s: int = 120
    """Seconds before the limit at which USR1 asks for a checkpoint and requeue."""
    rollout_port: int = 30000
    """Port of the rollout server on each rollout node (URLs go to RUN_DIR/rollout_hosts.txt)."""
    rollout_wait_s: int = 1800
    """Seconds the job waits for the rollout servers' /health before it gives up."""
    rollout_server_cmd: str = ""
    """Command each rollout node runs; empty = SGLang's launch_server on GPUs, `megaent serve` on CPU. {python},
    {model} and {port} become the interpreter, model.path and slurm.rollout_port (e.g. "megaent serve --model
    {model} --host 0.0.0.0 --port {port}"); it must listen on {port} of every interface, key $MEGAENT_API_KEY."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, one per entry (e.g. ["--qos=high", "--constraint=h100"])."""
    setup: str = ""
    """Shell lines run before srun (e.g. "source ~/venv/bin/activate"; module loads)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
