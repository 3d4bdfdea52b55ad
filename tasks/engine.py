"""The one training engine: the teacher uses it now, the DistilBERT and ALBERT students reuse it.

It trains any `nn.Module` with a caller-supplied `loss_fn(model, batch) -> (loss, {term: value})`.

Why a short explicit loop rather than `transformers.Trainer` + accelerate: what this project trains
differs from a stock fine-tune in exactly the places Trainer hides. The losses are computed only at the
labelled positions and, for the students, are several weighted terms against a teacher; every term has
to reach the metrics sink. Checkpoints must load with `torch.load(weights_only=True)` and resume at the
exact batch so an interrupted run ends with the same weights (Trainer pickles RNG states, and its resume
re-iterates a dataloader). And the figure that tells whether a GPU is well used, MFU, needs the token
count and the model's FLOPs per token. Overriding Trainer's `compute_loss`, `_save_checkpoint`, the
sampler and the callbacks would leave less of Trainer than this file, spread over hooks a reader must
learn first. What is not this project's idea still comes from libraries: the model (transformers),
the data (datasets), AdamW / DDP / autocast / SDPA (torch), the schedule (transformers).

Runtime: CUDA when available (bf16 autocast, TF32 matmuls, fused AdamW), else CPU (fp32, plain AdamW).
Under `torchrun --nproc_per_node N` it runs torch DDP: every rank walks the same deterministic stream of
micro-batches and takes every N-th one; only rank 0 logs, evaluates and writes checkpoints. A single
process never touches torch.distributed.

Data order is a pure function of (seed, epoch): shuffle, sort by length within large random chunks,
cut into batches, shuffle the batches. A checkpoint stores the (epoch, micro-batch) position, so a
resume regenerates the epoch's order and continues at the exact micro-batch.

Gradient accumulation averages the micro-batch losses (nanoGPT's convention): it equals one big batch
exactly when every micro-batch has the same number of loss positions, and closely otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import get_linear_schedule_with_warmup

from tasks.artifacts import atomic_output_file
from tasks.section import TrainingConfig

CHECKPOINT = "last.pt"
CHUNK_BATCHES = 64  # batches per length-sorting chunk: long enough to bucket, short enough to stay random
SHARD_BUFFER = 4  # shards shuffled together when the data is sharded (the teacher cache keeps 16 open)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6  # BERT's
# Dense bf16 peak FLOP/s by device name (first match wins); an unknown device reports no MFU.
GPU_BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                 ("A100", 312e12))

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
MetricsSink = Callable[[dict[str, float], int | None], None]


# ------------------------------------------------------------------------------------------------
# runtime: device, precision, processes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else "bf16"


DIST_TIMEOUT_S = 1800.0  # collectives: evaluation is sharded, so no rank waits long on another


def setup_runtime(precision: str = "auto") -> Runtime:
    """The device and processes this run has. Joins a torchrun process group when launched by one."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank that waits longer than this on a collective fails with an error instead of hanging.
        timeout = timedelta(seconds=float(os.environ.get("LIGHTBERT_DIST_TIMEOUT_S", DIST_TIMEOUT_S)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        distributed = True
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
    else:
        device = torch.device("cpu")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return Runtime(device, torch.bfloat16 if bf16 else None, rank, world, distributed)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


def model_flops_per_token(model: nn.Module, seq_len: float) -> float:
    """The textbook estimate of training FLOPs per token: 6 N (forward + backward through every weight)
    plus attention, 12 L H T (PaLM appendix B; nanoGPT's estimate_mfu). It counts a shared layer once and
    the vocabulary projection at every token; MFU uses counted_flops instead."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", 0)
    return 6 * n_params + 12 * layers * hidden * seq_len


def counted_flops(step: Callable[[], Any]) -> tuple[int, Any]:
    """(the FLOPs `step()` actually runs, forward and backward, counted op by op by torch's FlopCounterMode,
    and what it returned): a layer shared L times is counted L times, the vocabulary projection only at
    the rows it is applied to (the loss positions), attention as computed (padding included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = step()
    return int(counter.get_total_flops()), result


# ------------------------------------------------------------------------------------------------
# data: length-bucketed batches in an order that is a pure function of (seed, epoch)
# ------------------------------------------------------------------------------------------------
def length_bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                            chunk_batches: int = CHUNK_BATCHES, shard_starts: np.ndarray | None = None,
                            shard_buffer: int = SHARD_BUFFER) -> list[np.ndarray]:
    """Index arrays of one epoch's batches: shuffle, sort by length within chunks of chunk_batches
    batches (little padding), cut into batches, shuffle the batches (no length order over time).

    With shard_starts (a dataset stored in shards of consecutive examples, the teacher cache), the epoch
    goes shard-buffer by shard-buffer instead: the shards in a random order, then within each group of
    shard_buffer shards the same shuffle, sort and batch, so that reads stay within a few open shards."""
    rng = np.random.default_rng([seed, epoch])
    if shard_starts is not None and len(shard_starts) > 1:
        bounds = [*map(int, shard_starts), len(lengths)]
        shards = rng.permutation(len(shard_starts))
        batches = []
        for g in range(0, len(shards), shard_buffer):
            group = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in shards[g:g + shard_buffer]])
            group_rng = np.random.default_rng([seed, epoch, g])
            batches += _bucketed(group[group_rng.permutation(len(group))], lengths, batch_size, chunk_batches,
                                 group_rng)
        return batches
    return _bucketed(rng.permutation(len(lengths)), lengths, batch_size, chunk_batches, rng)


def _bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, chunk_batches: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    chunk = batch_size * chunk_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def micro_batches(lengths: np.ndarray, batch_size: int, seed: int, start: tuple[int, int] = (0, 0),
                  shard_starts: np.ndarray | None = None) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Endless (position after this batch, indices) from position (epoch, batch index) on."""
    epoch, index = start
    while True:
        batches = length_bucketed_batches(lengths, batch_size, seed, epoch, shard_starts=shard_starts)
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


@dataclass
class PadCollator:
    """Columns (as `Dataset.__getitem__(list)` returns them) -> padded tensors. List columns are padded
    to the longest row (rounded up to pad_to_multiple_of) with pad_values[column] (default 0);
    scalar columns become 1-d tensors. Label columns should pad with -100."""

    columns: tuple[str, ...]
    pad_values: dict[str, int] = field(default_factory=dict)
    pad_to_multiple_of: int = 1

    def __call__(self, rows: Mapping[str, list]) -> dict[str, torch.Tensor]:
        batch = {}
        for name in self.columns:
            values = rows[name]
            if values and isinstance(values[0], list | tuple | np.ndarray):
                width = max(len(v) for v in values)
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
                out = np.full((len(values), width), self.pad_values.get(name, 0), dtype=np.int64)
                for i, v in enumerate(values):
                    out[i, :len(v)] = v
                batch[name] = torch.from_numpy(out)
            else:
                batch[name] = torch.as_tensor(values, dtype=torch.long)
        return batch


# ------------------------------------------------------------------------------------------------
# optimizer and checkpoints
# ------------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm weights (1-d) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, **fused)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain lists (loadable with weights_only)."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Written to a temporary file beside `path`, synced, then renamed: a kill leaves the old one."""
    with atomic_output_file(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Puts the loss function inside a module's forward, so that DDP sees every forward whatever
    submodules the loss function calls (e.g. the teacher's encoder and heads separately)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(self.model, batch)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int  # non-padding tokens, all ranks
    train_seconds: float  # this process's training time (a resumed run counts only its own part)
    tokens_per_s: float  # over train_seconds
    resumed_from_step: int | None
    final_losses: dict[str, float]  # training loss terms averaged over the last log window
    eval_metrics: dict[str, float]  # eval_fn at the end (main process only)
    runtime: Runtime


def _count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(next(iter(batch.values())).numel())


@dataclass
class _TrainState:
    """Where training stands: what a checkpoint stores besides the weights, optimizer and RNGs."""

    step: int = 0
    position: tuple[int, int] = (0, 0)  # (epoch, micro-batch) of the data stream
    tokens_seen: int = 0  # counted at each log step
    resumed_from: int | None = None


@dataclass
class _FlopsPerToken:
    """Training FLOPs per real token, counted on the run's first micro-batch (for MFU)."""

    value: float | None = None


@dataclass(frozen=True)
class _WindowTotals:
    """One log window summed over all ranks."""

    losses: dict[str, float]  # train_<term>: per-step mean over the window (and the ranks)
    tokens: float  # non-padding tokens
    seq_len: float  # padded tokens per row
    seconds: float

    def metrics(self, learning_rate: float, flops_per_token: float | None, peak: float | None,
                world_size: int) -> dict[str, float]:
        metrics = dict(self.losses, learning_rate=learning_rate,
                       tokens_per_s=self.tokens / max(self.seconds, 1e-9))
        if peak is not None and flops_per_token is not None:
            metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / (peak * world_size)
        return metrics


@dataclass
class _LogWindow:
    """What happened since the last log step: summed loss terms, token / row counts, seconds."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no sync per step
    steps: int = 0
    tokens: int = 0
    padded: int = 0
    rows: int = 0
    seconds: float = 0.0
    _started: float = 0.0

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def end_step(self) -> None:
        self.seconds += time.perf_counter() - self._started

    def count(self, host_batch: dict[str, torch.Tensor], rows: int) -> None:
        """Counted on the host: no device sync per micro-batch."""
        self.tokens += _count_tokens(host_batch)
        self.padded += next(iter(host_batch.values())).numel()
        self.rows += rows

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def reduce(self, rt: Runtime) -> _WindowTotals:
        """Sums over the ranks (waiting for the device), then ends this step's clock."""
        counts = torch.tensor([self.tokens, self.padded, self.rows], dtype=torch.float64, device=rt.device)
        names = sorted(self.sums)
        values = torch.stack([self.sums[n].to(rt.device) for n in names]) / self.steps
        if rt.distributed:
            dist.all_reduce(counts)
            dist.all_reduce(values)
            values /= rt.world_size
        counts_l, values_l = counts.tolist(), values.tolist()  # waits for the device
        self.end_step()
        return _WindowTotals(losses={f"train_{n}": v for n, v in zip(names, values_l, strict=True)},
                             tokens=counts_l[0], seq_len=counts_l[1] / max(counts_l[2], 1), seconds=self.seconds)


def _accumulation_steps(cfg: TrainingConfig, rt: Runtime) -> int:
    per_step = cfg.batch_size * rt.world_size
    if cfg.effective_batch_size % per_step:
        raise ValueError(f"effective_batch_size {cfg.effective_batch_size} is not a multiple of batch_size "
                         f"x processes ({cfg.batch_size} x {rt.world_size})")
    return cfg.effective_batch_size // per_step


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resume(ckpt_path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            rt: Runtime, seed: int) -> _TrainState:
    """Loads ckpt_path into model, optimizer, scheduler and the RNGs when it exists."""
    if rt.distributed:
        dist.barrier()  # rank 0 may still be preparing the directory the checkpoint lives in
    if ckpt_path is None or not ckpt_path.is_file():
        return _TrainState()
    state = load_checkpoint(ckpt_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if rt.world_size == 1:
        set_rng_state(state["rng"])
    else:  # ranks drew different dropout masks; only rank 0's were saved, so reseed by step
        torch.manual_seed(seed + rt.rank + 1_000_003 * state["step"])
    return _TrainState(step=state["step"], position=tuple(state["position"]), tokens_seen=state["tokens_seen"],
                       resumed_from=state["step"])


def _wrap(model: nn.Module, loss_fn: LossFn, rt: Runtime) -> nn.Module:
    wrapped: nn.Module = _LossModule(model, loss_fn)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return wrapped


def _progress_bar(enabled: bool, rt: Runtime, cfg: TrainingConfig, step: int):
    if not (enabled and rt.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", mininterval=1.0, leave=False)


class _HostBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from `start` on, read and collated on the host, in DataLoader workers: the
    same sequence _next_micro_batches walks (every world_size-th of the shared stream), so the loop and the
    workers agree batch for batch. Worker w of n collates every n-th, and the DataLoader hands them out in
    turn, which keeps the order."""

    def __init__(self, train_data, collate, lengths: np.ndarray, batch_size: int, seed: int,
                 start: tuple[int, int], rank: int, world: int):
        self.train_data, self.collate, self.lengths = train_data, collate, lengths
        self.batch_size, self.seed, self.start, self.rank, self.world = batch_size, seed, start, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = micro_batches(self.lengths, self.batch_size, self.seed, self.start,
                               getattr(self.train_data, "shard_starts", None))
        mine = (idx for k, (_, idx) in enumerate(stream) if k % self.world == self.rank)
        for j, idx in enumerate(mine):
            if j % workers == worker:
                yield self.collate(self.train_data[idx]), len(idx)


def _host_batches(train_data, collate, lengths: np.ndarray, cfg: TrainingConfig, seed: int,
                  start: tuple[int, int], rt: Runtime):
    """An iterator of (collated host batch, rows) prepared by DataLoader workers, or None when the loop
    collates itself (training.num_workers 0, the CPU default)."""
    on_gpu = rt.device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers is not None else (2 if on_gpu else 0)
    if workers == 0:
        return None
    dataset = _HostBatches(train_data, collate, lengths, cfg.batch_size, seed, start, rt.rank, rt.world_size)
    # Its own generator: seeding the workers must not draw from the random numbers training uses (dropout).
    generator = torch.Generator().manual_seed(seed)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=on_gpu,
                                            prefetch_factor=cfg.prefetch_factor, generator=generator))


def _next_micro_batches(stream: Iterator[tuple[tuple[int, int], np.ndarray]], accum: int, rt: Runtime,
                        position: tuple[int, int]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """One optimizer step's accum x world_size micro-batches of the shared stream: this rank takes every
    world_size-th. Returns them and the stream position after them."""
    mine = []
    for k in range(accum * rt.world_size):
        position, idx = next(stream)
        if k % rt.world_size == rt.rank:
            mine.append(idx)
    return mine, position


def _forward_backward(wrapped: nn.Module, batch: dict[str, torch.Tensor], accum: int, no_sync: bool, rt: Runtime):
    """One micro-batch: forward under autocast, backward of loss / accum (DDP's all-reduce skipped with
    no_sync); returns (loss, loss terms)."""
    with wrapped.no_sync() if no_sync else contextlib.nullcontext():
        with rt.autocast():
            loss, terms = wrapped(batch)
        (loss / accum).backward()
    return loss, terms


def _micro_steps(wrapped: nn.Module, train_data, collate, mine: list[np.ndarray], accum: int, rt: Runtime,
                 window: _LogWindow, flops: _FlopsPerToken | None = None, host_batches=None) -> None:
    """Forward and backward over this rank's micro-batches, accumulating the mean gradient; DDP
    all-reduces only at the last. With `flops` still unmeasured, the first micro-batch's FLOPs are counted.
    With host_batches, the batches come collated (and pinned) from the DataLoader workers."""
    for j, idx in enumerate(mine):
        if host_batches is None:
            host_batch = collate(train_data[idx])
        else:
            host_batch, rows = next(host_batches)
            assert rows == len(idx), "the DataLoader workers left the loop's batch sequence"
        window.count(host_batch, len(idx))
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in host_batch.items()}
        no_sync = rt.distributed and j < len(mine) - 1
        step = functools.partial(_forward_backward, wrapped, batch, accum, no_sync, rt)
        if flops is not None and flops.value is None:
            counted, (loss, terms) = counted_flops(step)
            flops.value = counted / max(_count_tokens(host_batch), 1)
        else:
            loss, terms = step()
        for name, value in {"loss": loss.detach(), **terms}.items():
            window.add(name, torch.as_tensor(value).detach().float() / accum)


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float | None,
                    window: _LogWindow) -> None:
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        window.add("grad_norm", grad_norm.detach().float())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module, Runtime], dict[str, float]] | None, rt: Runtime,
              metrics_sink: MetricsSink | None, step: int) -> dict[str, float]:
    """eval_fn under no_grad and autocast on every rank (the scorers shard the batches across the ranks and
    all-reduce their sums: tasks.scoring.score_pretraining); the main process's metrics go to the sink."""
    if eval_fn is None:
        return {}
    was_training = model.training
    model.eval()
    # fork_rng: evaluating must not change the random numbers training draws next (resume equality)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []), \
            torch.no_grad(), rt.autocast():
        metrics = eval_fn(model, rt)
    model.train(was_training)
    if metrics_sink is not None and rt.is_main:
        metrics_sink(metrics, step)
    return metrics


def _save(ckpt_path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
          state: _TrainState, cfg: TrainingConfig, seed: int, rt: Runtime) -> None:
    """The resumable checkpoint, written by the main process only."""
    if ckpt_path is None or not rt.is_main:
        return
    save_checkpoint(ckpt_path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": state.step,
        "position": list(state.position), "tokens_seen": state.tokens_seen,
        "effective_batch_size": cfg.effective_batch_size, "seed": seed,
    })


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data,
    cfg: TrainingConfig,
    collate: Callable[[Mapping[str, list]], dict[str, torch.Tensor]],
    *,
    seed: int,
    checkpoint_dir: Path | None = None,
    eval_fn: Callable[[nn.Module, Runtime], dict[str, float]] | None = None,
    metrics_sink: MetricsSink | None = None,
    runtime: Runtime | None = None,
    length_column: str = "length",
    progress: bool = False,
) -> TrainResult:
    """Train `model` on `train_data` (a datasets.Dataset with a length column) for cfg.max_steps
    optimizer steps; resumes from checkpoint_dir/last.pt when it exists. eval_fn(model, runtime) runs
    under no_grad and autocast every cfg.eval_every steps and at the end."""
    rt = runtime or setup_runtime(cfg.precision)
    accum = _accumulation_steps(cfg, rt)
    lengths = np.asarray(train_data[length_column])

    _seed_all(seed + rt.rank)
    model.to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    state = _resume(ckpt_path, model, optimizer, scheduler, rt, seed)
    wrapped = _wrap(model, loss_fn, rt)

    peak = gpu_peak_flops(rt.device)
    flops = _FlopsPerToken()  # MFU (on a GPU whose peak is known): counted on the first micro-batch
    stream = micro_batches(lengths, cfg.batch_size, seed, state.position, getattr(train_data, "shard_starts", None))
    host_batches = _host_batches(train_data, collate, lengths, cfg, seed, state.position, rt)
    window = _LogWindow()
    train_time, run_tokens, final_losses = 0.0, 0, {}
    bar = _progress_bar(progress, rt, cfg, state.step)

    model.train()
    while state.step < cfg.max_steps:
        window.start_step()
        mine, state.position = _next_micro_batches(stream, accum, rt, state.position)
        _micro_steps(wrapped, train_data, collate, mine, accum, rt, window, flops if peak is not None else None,
                     host_batches)
        _optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, window)
        state.step += 1
        window.steps += 1
        if bar is not None:
            bar.update(1)

        # log
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            totals = window.reduce(rt)
            state.tokens_seen += int(totals.tokens)
            run_tokens += int(totals.tokens)
            train_time += totals.seconds
            final_losses = totals.losses
            metrics = totals.metrics(scheduler.get_last_lr()[0], flops.value, peak, rt.world_size)
            if rt.is_main and metrics_sink is not None:
                metrics_sink(metrics, state.step)
            if bar is not None:
                bar.set_postfix(loss=f"{final_losses['train_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            window = _LogWindow()
        else:
            window.end_step()

        # evaluate and save
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            _evaluate(model, eval_fn, rt, metrics_sink, state.step)
        if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps):
            _save(ckpt_path, model, optimizer, scheduler, state, cfg, seed, rt)
    if bar is not None:
        bar.close()
    del host_batches  # stops the DataLoader's workers

    eval_metrics = _evaluate(model, eval_fn, rt, metrics_sink, state.step)
    return TrainResult(
        steps=state.step, tokens_seen=state.tokens_seen, train_seconds=train_time,
        tokens_per_s=run_tokens / train_time if train_time else 0.0,
        resumed_from_step=state.resumed_from, final_losses=final_losses, eval_metrics=eval_metrics, runtime=rt,
    )


# ------------------------------------------------------------------------------------------------
# the end of a training stage's run: what it reports, what it keeps, what it drops
# ------------------------------------------------------------------------------------------------
def rounded(metrics: Mapping[str, float], digits: int = 5) -> dict[str, float]:
    return {k: round(v, digits) for k, v in metrics.items()}


def run_summary(result: TrainResult) -> dict[str, float]:
    """What every training stage reports of a run: steps, tokens seen, training speed and time."""
    return {"steps": result.steps, "tokens_seen": result.tokens_seen,
            "train_tokens_per_s": round(result.tokens_per_s, 1), "train_seconds": round(result.train_seconds, 2)}


def save_trained(model: nn.Module, model_dir: Path, tokenizer=None) -> None:
    """The trained weights with save_pretrained (safetensors, on the CPU), beside their tokenizer: an
    object with save_pretrained, or a folder whose files are copied (its manifest.json left out)."""
    import shutil

    model.cpu().save_pretrained(model_dir, safe_serialization=True)
    if isinstance(tokenizer, str | Path):
        for path in Path(tokenizer).iterdir():
            if path.is_file() and path.name != "manifest.json":
                shutil.copy2(path, Path(model_dir) / path.name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(model_dir)


def finish_run(checkpoint_dir: Path, result_path: Path | None = None, result: Any = None) -> None:
    """A run is finished: its result written (atomically) first, then its checkpoints dropped, as nothing
    is left to resume. A kill between the two leaves the result and a checkpoint, never neither."""
    import shutil

    from tasks.artifacts import atomic_write_json

    if result_path is not None:
        atomic_write_json(result_path, result)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def matmul_gflops(threads: int | None = None, size: int = 2048, repeats: int = 5) -> float:
    """This machine's measured fp32 matmul speed (size x size, on `threads` torch threads; None = torch's
    current setting), in GFLOP/s: the figure every time a report or benchmark quotes is put beside,
    because the same preset runs at very different speeds on machines that look alike."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        a @ b  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 * repeats / seconds / 1e9
