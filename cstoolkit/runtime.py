"""Runtime: device and precision (HF Accelerate), seeds, output folder, progress, logs, checkpoints.

Training loops of methods run through :meth:`Runtime.train_loop`, which gives resumable,
bit-identical training on CPU: every ``checkpoint_every`` steps the trainable tensors, optimiser
states and random generators are written (safetensors + weights-only torch file), atomically; a
resumed run starts after the latest checkpoint of each stage, and stages already finished are
restored from their final state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from .compile import CompiledForward, have_cxx_compiler
from .errors import TrainingDiverged, UserError
from .io import save_safetensors, umask_mode
from .phases import PhaseTimer

log = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RuntimeConfig:
    """The recipe's ``runtime:`` section."""

    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "dtype of the frozen base model; trainable weights stay fp32"}
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = field(default="runs/default", metadata={"help": "relative to the working directory"})
    checkpoint_every: int = field(default=0, metadata={"min": 0, "help": "steps between checkpoints; 0 = none"})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    log_every: int = field(default=10, metadata={"min": 1})
    progress: bool = True
    cuda_graph: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "replay fixed training steps as CUDA graphs: auto = on for CUDA in the "
                                          "steps whose captured form a GPU run has checked against the eager one, "
                                          "on = also in the steps no GPU run has checked yet (the README's runtime "
                                          "row and the methods' docs say which), off = never"}
    )
    compile: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "run the frozen model with its LoRA banks under torch.compile in training "
                                          "steps (cache on disk: $XDG_CACHE_HOME/cstoolkit/torch_compile); auto: on "
                                          "for CUDA when a training stage has at least compile_min_steps steps, off "
                                          "on the CPU; on: also on the CPU (needs a C++ compiler)"}
    )
    compile_min_steps: int = field(
        default=4000, metadata={"min": 0, "help": "runtime.compile auto: the fewest steps of a training stage for "
                                                  "which the compile pays (H100, SDXL UnZipLoRA: 0.010 s a step "
                                                  "saved against a 32 s warm-cache compile: about 3,200 steps)"}
    )
    cuda_memory: Literal["expandable", "default"] = field(
        default="expandable", metadata={"help": "CUDA allocator: expandable segments (reserved memory stays close "
                                                "to what is allocated) or PyTorch's default; an explicit "
                                                "PYTORCH_CUDA_ALLOC_CONF wins"}
    )
    lora_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        default="auto", metadata={"help": "dtype of the finished LoRA files (checkpoints stay float32); "
                                          "auto: bfloat16 for mixed_precision bf16, else float16"}
    )


@dataclass
class TrainState:
    """What a training stage checkpoints: trainable tensors, buffers, optimisers, generators.

    Tensors are restored in place, so the objects a method holds stay valid after a resume.
    """

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"param/{k}": v.detach().cpu().contiguous() for k, v in self.params.items()}
        out.update({f"buffer/{k}": v.detach().cpu().contiguous() for k, v in self.buffers.items()})
        out.update({f"generator/{k}": g.get_state() for k, g in self.generators.items()})
        out["rng/torch"] = torch.get_rng_state()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(tensors[f"param/{k}"])
            for k, v in self.buffers.items():
                v.copy_(tensors[f"buffer/{k}"])
        for k, g in self.generators.items():
            g.set_state(tensors[f"generator/{k}"])
        torch.set_rng_state(tensors["rng/torch"])


def configure_cuda_allocator(mode: str) -> bool:
    """Turn on expandable segments in PyTorch's CUDA allocator (``mode == "expandable"``) unless the user
    set ``PYTORCH_CUDA_ALLOC_CONF``. Segments then grow and shrink in place instead of piling up blocks
    of fixed sizes, so the reserved memory of a run whose stages allocate differently shaped tensors
    stays near its allocated peak. Returns whether the setting was applied."""
    if mode != "expandable" or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return False
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # read when the allocator starts
        return True
    try:  # already started: applies to the segments allocated from now on
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return True
    except (AttributeError, RuntimeError):
        return False


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700; the folder it becomes follows the umask
    return tmp


def has_checkpoints(output_dir: str | Path) -> bool:
    """Whether a run folder holds a complete checkpoint of any stage (what ``--resume`` continues from)."""
    return any(p.parent.name == "final" or p.parent.name.startswith("step-")  # not a half-written .step-*.tmp
               for p in Path(output_dir).glob("checkpoints/*/*/meta.json"))


class Runtime:
    """Execution context of one run (device, precision, seed, output folder)."""

    def __init__(self, config: RuntimeConfig | None = None, output_dir: str | Path | None = None,
                 *, resume: bool = False):
        self.config = config or RuntimeConfig()
        self.output_dir = Path(output_dir if output_dir is not None else self.config.output_dir)
        self.resume = resume
        #: write tensorboard scalars to ``output_dir/logs`` (a full run turns this on)
        self.write_logs = False
        self._accelerator: Any = None
        self._device: torch.device | None = None
        self._trackers = False
        #: wall time and CUDA memory per phase of the run (``with runtime.phase("fit"): ...``)
        self.phases = PhaseTimer()

    # ---------------------------------------------------------------- device and precision
    @property
    def accelerator(self) -> Any:
        if self._accelerator is None:
            from accelerate import Accelerator

            cpu = self.config.device == "cpu" or (self.config.device == "auto" and not torch.cuda.is_available())
            self._accelerator = Accelerator(cpu=cpu, mixed_precision=self.config.mixed_precision)
        return self._accelerator

    @property
    def device(self) -> torch.device:
        """CPU, or the process's GPU (from Accelerate's process state, as under ``accelerate launch``).

        Not read from :attr:`accelerator`: Accelerate keeps one mixed-precision setting per process,
        and runs (tests, notebooks) with different ``mixed_precision`` in one process must work.
        """
        if self._device is None:
            self.check_device()
            cpu = self.config.device == "cpu" or (self.config.device == "auto" and not torch.cuda.is_available())
            if cpu:
                self._device = torch.device("cpu")
            else:
                configure_cuda_allocator(self.config.cuda_memory)
                from accelerate import PartialState

                self._device = PartialState().device
        return self._device

    def check_device(self) -> None:
        """A :class:`UserError` when the configured device is not there (``cuda`` without a CUDA GPU);
        runs call it before they write anything."""
        if self.config.device == "cuda" and not torch.cuda.is_available():
            raise UserError("runtime.device", "cuda was asked for but no CUDA GPU is available",
                            "set runtime.device: cpu (or auto)")

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of frozen base weights (from ``mixed_precision``)."""
        return _DTYPES[self.config.mixed_precision]

    @property
    def lora_dtype(self) -> torch.dtype:
        """dtype the LoRA files of a finished decomposition are stored in (``lora_dtype``)."""
        setting = self.config.lora_dtype
        if setting == "auto":
            return torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]

    @property
    def use_cuda_graph(self) -> bool:
        """Whether methods should capture their fixed-shape training steps as CUDA graphs."""
        return self.device.type == "cuda" and self.config.cuda_graph != "off"

    @property
    def cuda_graph_asked(self) -> bool:
        """Whether the user asked for CUDA graphs explicitly (``cuda_graph: on``, on CUDA): what steps whose
        captured form no GPU run has checked yet use instead of :attr:`use_cuda_graph` (``auto`` leaves them
        eager)."""
        return self.device.type == "cuda" and self.config.cuda_graph == "on"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the mixed precision (a no-op for ``no``)."""
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def autocast_for(self, model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
        """What a training step runs ``model`` under: :meth:`autocast`, or nothing where every floating
        parameter and buffer of ``model`` already is in the mixed-precision dtype (the frozen base in bf16 on a
        GPU). There autocast only adds casts: norms and softmax computed in fp32, cast back before each
        matrix product. Trainable weights kept elsewhere in fp32 (LoRA banks) cast themselves once per step."""
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext
        dtype = self.weight_dtype
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if tensors and all(t.dtype == dtype for t in tensors):
            return contextlib.nullcontext
        return self.autocast

    def use_compile(self, steps: int) -> bool:
        """Whether a training stage of ``steps`` steps should run its frozen model compiled (``compile``):
        ``on``; ``auto`` on CUDA with at least ``compile_min_steps`` steps; never for ``off``."""
        setting = self.config.compile
        if setting == "off":
            return False
        if setting == "on":
            return True
        return self.device.type == "cuda" and steps >= self.config.compile_min_steps

    def compiled(self, module: torch.nn.Module, *, steps: int, label: str = "") -> CompiledForward | None:
        """``module``'s forward compiled for a training stage of ``steps`` steps (:meth:`use_compile`), or
        ``None``. Each compile is logged (seconds, cold or warm cache), written to ``phases.json`` under
        ``compile`` and timed as a phase ``.../compile``. On a CPU without a C++ compiler: ``None``, with a
        warning. The caller removes it (:meth:`CompiledForward.remove`) when the stage ends."""
        if not self.use_compile(steps):
            return None
        if self.device.type == "cpu" and not have_cxx_compiler():
            log.warning("runtime.compile: on needs a C++ compiler on the CPU (no g++, c++ or clang++ on the PATH); "
                        "training runs eagerly")
            return None
        return CompiledForward(module, label=label, phases=self.phases,
                               on_record=lambda r: self.phases.note("compile", r.as_dict()))

    def seed_everything(self, offset: int = 0) -> None:
        from accelerate.utils import set_seed

        set_seed(self.config.seed + offset)

    def generator(self, offset: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A generator seeded with ``seed + offset`` (CPU unless ``device`` is given)."""
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(self.config.seed + offset)
        return g

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Time a phase of the run and its CUDA memory (:class:`~cstoolkit.phases.PhaseTimer`)."""
        return self.phases(name)

    # ---------------------------------------------------------------- progress and logs
    def progress(self, iterable: Any = None, *, total: int | None = None, desc: str = "", initial: int = 0) -> Any:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not self.config.progress,
                    dynamic_ncols=True, leave=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write scalars to tensorboard under ``output_dir/logs`` (when :attr:`write_logs`), and as
        JSON lines to ``logs/scalars.jsonl`` (what ``report.html`` plots)."""
        if not self.write_logs:
            return
        (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "logs" / "scalars.jsonl", "a") as fh:
            fh.writelines(json.dumps({"tag": k, "step": step, "value": float(v)}) + "\n" for k, v in metrics.items())
        if not self._trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._trackers = None  # type: ignore[assignment]
                return
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "logs"))
            self._trackers = True
        if self._trackers:
            for k, v in metrics.items():
                self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._trackers:
            self._writer.close()
            self._trackers = False

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _stage_dir(self, stage: str) -> Path:
        return self.checkpoint_dir / stage

    def latest_checkpoint(self, stage: str) -> tuple[int, Path] | None:
        """(completed steps, folder) of the newest checkpoint of ``stage``; ``final`` wins."""
        root = self._stage_dir(stage)
        if not root.is_dir():
            return None
        final = root / "final"
        if (final / "meta.json").is_file():
            return json.loads((final / "meta.json").read_text())["step"], final
        found = []
        for d in root.glob("step-*"):
            if (d / "meta.json").is_file():
                found.append((json.loads((d / "meta.json").read_text())["step"], d))
        return max(found) if found else None

    def save_checkpoint(self, stage: str, step: int, state: TrainState, *, final: bool = False) -> Path:
        target = self._stage_dir(stage) / ("final" if final else f"step-{step:07d}")
        tmp = _atomic_dir(target)
        try:
            save_safetensors(state.tensors(), tmp / "state.safetensors", finite=False)
            torch.save({k: o.state_dict() for k, o in state.optimizers.items()}, tmp / "optim.pt")
            (tmp / "meta.json").write_text(json.dumps({"stage": stage, "step": step, "final": final}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        steps = sorted(self._stage_dir(stage).glob("step-*"))
        for old in steps[: max(0, len(steps) - self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self, folder: Path, state: TrainState) -> int:
        from safetensors.torch import load_file

        state.load_tensors(load_file(str(folder / "state.safetensors")))
        optim = torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
        for k, o in state.optimizers.items():
            o.load_state_dict(optim[k])
        return int(json.loads((folder / "meta.json").read_text())["step"])

    def train_loop(self, stage: str, total_steps: int, state: TrainState, *, warmup: int = 0) -> "TrainLoop":
        """Iterate over the steps of a training stage, resuming and checkpointing as configured.

        ``warmup``: how many of the ``total_steps`` are warm-up steps before the ones the recipe
        counts; the progress shows them on a bar of their own (``<stage> warm-up``).
        """
        return TrainLoop(self, stage, total_steps, state, warmup=warmup)


class TrainLoop:
    """``for step in loop: ...; loop.log(loss=...)`` with resume, checkpoints, progress, logs."""

    def __init__(self, runtime: Runtime, stage: str, total_steps: int, state: TrainState, *, warmup: int = 0):
        self.runtime = runtime
        self.stage = stage
        self.total_steps = total_steps
        self.warmup = max(0, min(warmup, total_steps))
        self.state = state
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self._bar: Any = None
        self._step = 0
        if runtime.resume:
            found = runtime.latest_checkpoint(stage)
            if found is not None:
                self.start_step = runtime.load_checkpoint(found[1], state)
                self.last_checkpoint = found[1]
                log.info("resumed stage %s at step %d from %s", stage, self.start_step, found[1])

    @property
    def resumed(self) -> bool:
        return self.start_step > 0

    def __iter__(self) -> Iterator[int]:
        every = self.runtime.config.checkpoint_every
        self._bar = self._open_bar(self.start_step)
        try:
            for step in range(self.start_step, self.total_steps):
                self._step = step
                if step == self.warmup and step > self.start_step:  # warm-up done: the counted steps' bar
                    self._bar.close()
                    self._bar = self._open_bar(step)
                yield step
                self._bar.update(1)
                done = step + 1
                if every and done % every == 0 and done < self.total_steps:
                    self.last_checkpoint = self.runtime.save_checkpoint(self.stage, done, self.state)
            if every and self.start_step < self.total_steps:
                self.last_checkpoint = self.runtime.save_checkpoint(
                    self.stage, self.total_steps, self.state, final=True
                )
        finally:
            self._bar.close()

    def _open_bar(self, step: int) -> Any:
        """The bar of the warm-up steps (while ``step`` < warm-up), else of the counted steps only."""
        if step < self.warmup:
            return self.runtime.progress(total=self.warmup, desc=f"{self.stage} warm-up", initial=step)
        return self.runtime.progress(total=self.total_steps - self.warmup, desc=self.stage,
                                     initial=step - self.warmup)

    def log(self, **metrics: float) -> None:
        """Record scalars of the current step; a non-finite loss stops training with the reason."""
        values = {k: float(v) for k, v in metrics.items()}
        for k, v in values.items():
            if not math.isfinite(v):
                where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
                raise TrainingDiverged(
                    f"{self.stage}: {k} became {v} at step {self._step}{where}; "
                    "try a lower learning rate or mixed_precision: no"
                )
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        if self._step % self.runtime.config.log_every == 0 or self._step == self.total_steps - 1:
            self.runtime.log({f"{self.stage}/{k}": v for k, v in values.items()}, self._step)
