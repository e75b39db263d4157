"""The training loop shared by the DreamBooth and control scripts, on accelerate.

Determinism: micro-batch k of the run (counted from step 0, across resumes) draws its data from
``StreamBatchSampler`` and its noise, timesteps and VAE samples from a generator seeded with
(seed, k, rank); the global torch RNG is re-seeded from the same values (adapter block dropout).
So a run stopped at a checkpoint and resumed ends bit-identical (on CPU) to an uninterrupted one.

Gradient accumulation is done here (``no_sync`` on the non-final micro-batches), and the lr
scheduler is stepped once per optimizer step; only the trainable modules go through
``accelerator.prepare`` (DDP).  Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..files import read_adapter_file, save_adapter
from ..model import ortho_layers
from .checkpoints import (
    check_output_dir,
    checkpoint_step,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    remove_if_empty,
    resolve_checkpoint,
    restore_adapter_values,
    save_training_state,
)
from .data import StreamBatchSampler, make_dataloader, mix_seed
from .runtime import (  # noqa: F401 (re-exported: the trainers import them from here)
    adapted_layer_count,
    build_accelerator,
    cast_trainable_to_fp32,
    flush_logs,
    make_optimizer,
    trainable_adapter_params,
    weight_dtype_of,
)
from .validation import log_images, save_grid

logger = logging.getLogger("diffusion_oft.training")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped without writing anything for that step."""


ADAPTER_FILE = "adapter.safetensors"
LOG_EVERY = 10  # steps between reads of the losses (host syncs); also before every checkpoint / validation


class AdapterTrainer:
    """Subclasses set up the models and data and say how a batch becomes a loss."""

    task = "train"
    project_name = "diffusion-oft"

    def __init__(self, args):
        self.args = args
        self.accelerator = None
        self.global_step = 0
        self.history: list[dict] = []  # per optimizer step: {"step", "loss", "lr"}
        self.outputs: dict[str, str] = {}

    # ---- to implement ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the models, add adapters, build ``self.dataset`` and ``self.collate_fn``."""
        raise NotImplementedError

    def adapted_components(self) -> dict[str, nn.Module]:
        """{component name: unwrapped module carrying the adapter} (unet, text_encoder, ...)."""
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        """Modules with trainable parameters, in a fixed order (prepared for DDP)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def compute_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def validation_grid(self, final: bool):
        """(grid image, list of images) or None when there is nothing to validate."""
        return None

    def write_model_card(self) -> None:
        pass

    def save_extra(self, directory: Path) -> None:
        """Files besides the adapter (e.g. the condition encoder); main process only."""

    def load_extra(self, directory: Path) -> None:
        """Restore what ``save_extra`` wrote."""

    def extra_metadata(self) -> dict[str, str]:
        return {}

    # ---- helpers -----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator else module

    def save_adapter_file(self, path: Path) -> Path:
        components = SimpleNamespace(components=self.adapted_components())
        meta = {"training": json.dumps({"task": self.task, "step": self.global_step, **self.training_summary()})}
        meta.update(self.extra_metadata())
        return save_adapter(components, path, adapter_name=self.args.adapter_name, extra_metadata=meta)

    def training_summary(self) -> dict:
        a = self.args
        return {
            "base_model": a.pretrained_model_name_or_path,
            "method": a.method,
            "learning_rate": a.learning_rate,
            "train_batch_size": a.train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "resolution": a.resolution,
            "seed": a.seed,
        }

    # ---- checkpoints -------------------------------------------------------------------------------
    def write_checkpoint(self, directory: Path) -> None:
        """The adapter file, the task's extra files, then the loop state (main process only)."""
        self.save_adapter_file(directory / ADAPTER_FILE)
        self.save_extra(directory)
        self.save_training_state(directory)

    def save_training_state(self, directory: Path) -> None:
        save_training_state(
            directory,
            self.optimizer,
            self.lr_scheduler,
            self.accelerator.scaler,
            extra={"global_step": self.global_step},
        )

    def load_checkpoint(self, directory: Path) -> None:
        """Restore the adapter, the extra files and the loop state of a checkpoint folder (every process)."""
        tensors, _ = read_adapter_file(directory / ADAPTER_FILE)
        for comp, module in self.adapted_components().items():
            restore_adapter_values(module, tensors, f"{comp}.", self.args.adapter_name)
        self.load_extra(directory)
        load_training_state(directory, self.optimizer, self.lr_scheduler, self.accelerator.scaler)

    def save_checkpoint(self) -> Path | None:
        """Written to a temporary folder that is renamed when complete: a kill mid-write leaves no
        checkpoint-<step> folder (and the older ones are pruned only after the new one exists)."""
        path = self.output_dir / f"checkpoint-{self.global_step}"
        if self.is_main:
            tmp = self.output_dir / f".tmp-checkpoint-{self.global_step}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self.write_checkpoint(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            for removed in prune_checkpoints(self.output_dir, self.args.checkpoints_total_limit, keep=path):
                logger.info("removed old checkpoint %s", removed)
            self.log(f"saved {path}")
        self.accelerator.wait_for_everyone()
        return path

    def check_finite(self, loss: torch.Tensor, micro: int) -> None:
        """Stop on a NaN / inf loss before it reaches the adapter: nothing of this step is written,
        so the last checkpoint (and adapter file) stay the last good ones.  (Reads the loss: a host sync.)"""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        self._raise_non_finite(float(loss.detach().float().mean()), self.global_step + 1, micro)

    def _raise_non_finite(self, value: float, step: int, micro: int) -> None:
        found = [p.name for p in list_checkpoints(self.output_dir)]
        last = f"the last good checkpoint is {self.output_dir / found[-1]}" if found else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} "
            f"(micro-batch {micro}): training stopped, nothing was written for this step; {last} "
            "(resume from it with --resume_from_checkpoint latest, e.g. with a lower --learning_rate)"
        )

    def flush_logs(self, pending: list[dict], progress) -> None:
        """Read, check (non-finite: stop) and log the losses of the steps since the last flush (``runtime``)."""
        flush_logs(self, pending, progress)

    def build_accelerator(self):
        return build_accelerator(self.args, self.output_dir)

    def make_optimizer(self, groups: list[dict]):
        return make_optimizer(self.args, groups)

    def run(self) -> dict:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        args = self.args
        start_time = time.time()
        created = check_output_dir(self.output_dir)  # read-only or full: fail now, not after hours
        try:
            self.accelerator = accelerator = self.build_accelerator()
            if args.allow_tf32 and torch.cuda.is_available():
                torch.backends.cuda.matmul.allow_tf32 = True
            set_seed(args.seed)
            if self.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            self.weight_dtype = weight_dtype_of(accelerator.mixed_precision)
            self.setup()
        except BaseException:
            if created and self.is_main:
                remove_if_empty(self.output_dir)  # a bad input leaves no empty output folder behind
            raise

        world = accelerator.num_processes
        accum = args.gradient_accumulation_steps
        n_examples = len(self.dataset)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * max(
                1, math.ceil(n_examples / (args.train_batch_size * world * accum))
            )
        groups = self.param_groups()
        if args.scale_lr:
            for group in groups:
                group["lr"] *= accum * args.train_batch_size * world
        self.optimizer = optimizer = self.make_optimizer(groups)
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        modules = self.trainable_modules()
        prepared = accelerator.prepare(*modules, optimizer)
        self.prepared_modules = list(prepared[:-1])
        self.optimizer = optimizer = prepared[-1]
        self.on_prepared(self.prepared_modules)
        self.lr_scheduler = lr_scheduler

        resume = resolve_checkpoint(self.output_dir, args.resume_from_checkpoint)
        if args.resume_from_checkpoint and resume is None:
            self.log(f"no checkpoint in {self.output_dir} to resume from; starting a new run")
        if resume is not None:
            self.load_checkpoint(resume)
            self.global_step = checkpoint_step(resume)
            self.log(f"resumed from {resume} (step {self.global_step})")

        if accelerator.is_main_process and args.report_to != "none":
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(self.project_name, config=config)

        n_params = sum(p.numel() for g in groups for p in g["params"])
        self.log(
            f"{self.task}: {args.method} adapter, {n_params:,} trainable parameters; {n_examples} examples, "
            f"batch {args.train_batch_size} x {world} process(es) x {accum} accumulation, "
            f"{args.max_train_steps} steps"
        )
        start_batch = self.global_step * accum
        remaining = max(0, args.max_train_steps - self.global_step) * accum
        sampler = StreamBatchSampler(
            n_examples,
            args.train_batch_size,
            args.seed,
            num_batches=remaining,
            start_batch=start_batch,
            num_replicas=world,
            rank=accelerator.process_index,
        )
        dataloader = make_dataloader(self.dataset, self.collate_fn, sampler, args.dataloader_num_workers)
        progress = tqdm(
            total=args.max_train_steps, initial=self.global_step, desc="steps", disable=not accelerator.is_main_process
        )
        for module in self.prepared_modules:
            module.train()
        self.set_train_mode(True)
        clip_params = [p for g in groups for p in g["params"]]
        # the adapters' post-step projections (COFT), listed once: walking the modules costs ms per step
        adapters = [
            m
            for comp in self.adapted_components().values()
            for layer in ortho_layers(comp)
            for m in layer.ortho_adapters.values()
        ]
        # Nothing in the step reads a tensor back to the host: the losses and the finiteness flag stay on the
        # device and are read every LOG_EVERY steps and before anything is written (flush_logs).
        step_logs: dict[str, torch.Tensor] = {}
        micro_losses: list[tuple[int, torch.Tensor]] = []
        pending: list[dict] = []
        try:
            for offset, batch in enumerate(dataloader):
                micro = start_batch + offset
                sync = (micro + 1) % accum == 0
                seed = mix_seed(args.seed, micro, accelerator.process_index)
                torch.manual_seed(mix_seed(args.seed, micro, accelerator.process_index, 1))
                generator = torch.Generator().manual_seed(seed)
                with contextlib.ExitStack() as stack:
                    if not sync and world > 1:
                        for module in self.prepared_modules:
                            stack.enter_context(accelerator.no_sync(module))
                    loss, logs = self.compute_loss(batch, generator)
                    micro_losses.append((micro, loss.detach()))
                    accelerator.backward(loss / accum)
                for k, v in logs.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else v
                    step_logs[k] = step_logs[k] + v / accum if k in step_logs else v / accum
                if not sync:
                    continue
                if args.max_grad_norm and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(clip_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # = apply_constraints on every adapted component
                    for method in adapters:
                        method.constrain_()
                self.global_step += 1
                pending.append(
                    {
                        "step": self.global_step,
                        "micro_losses": micro_losses,
                        "logs": step_logs,
                        "lr": lr_scheduler.get_last_lr()[0],
                    }
                )
                step_logs, micro_losses = {}, []
                progress.update(1)
                checkpoint = (
                    self.global_step % args.checkpointing_steps == 0 and self.global_step < args.max_train_steps
                )
                validation = (
                    self.wants_validation()
                    and self.global_step % args.validation_steps == 0
                    and self.global_step < args.max_train_steps
                )
                if checkpoint or validation or self.global_step % LOG_EVERY == 0:
                    self.flush_logs(pending, progress)
                if checkpoint:
                    self.save_checkpoint()
                if validation:
                    self.validate(final=False)
            self.flush_logs(pending, progress)
        except NonFiniteLossError:
            raise
        except Exception:
            # an op may fail on the NaNs of a step not read yet: report the NaN, not its consequence
            if pending:
                self.flush_logs(pending, progress)
            raise
        progress.close()
        accelerator.wait_for_everyone()
        self.set_train_mode(False)
        if self.global_step % args.checkpointing_steps == 0 and self.global_step > 0:
            self.save_checkpoint()  # the final step, when it falls on a checkpoint boundary
        if self.is_main:
            path = self.save_adapter_file(self.output_dir / ADAPTER_FILE)
            self.save_extra(self.output_dir)
            self.outputs["adapter"] = str(path)
            self.log(f"saved {path}")
        self.validate(final=True)
        if self.is_main:
            self.write_model_card()
            (self.output_dir / "train_history.json").write_text(json.dumps(self.history), encoding="utf-8")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        elapsed = time.time() - start_time
        self.log(f"done: {self.global_step} steps in {elapsed:.1f} s; outputs in {self.output_dir}")
        return {"global_step": self.global_step, "history": self.history, "outputs": self.outputs, "seconds": elapsed}

    def on_prepared(self, modules: list[nn.Module]) -> None:
        """Called with the prepared (possibly DDP-wrapped) trainable modules, in order."""

    def set_train_mode(self, training: bool) -> None:
        for module in self.trainable_modules():
            module.train(training)

    def wants_validation(self) -> bool:
        return bool(self.args.validation_prompt)

    def validate(self, final: bool) -> None:
        """Main process renders the grid; the others wait."""
        accelerator = self.accelerator
        if self.is_main:
            self.set_train_mode(False)
            with torch.no_grad(), accelerator.autocast():
                result = self.validation_grid(final)
            self.set_train_mode(not final)
            if result is not None:
                grid, images = result
                name = "samples.png" if final else f"validation-{self.global_step:06d}.png"
                folder = self.output_dir if final else self.output_dir / "validation"
                path = save_grid(grid, folder / name)
                if final:
                    self.outputs["samples"] = str(path)
                log_images(accelerator, "final" if final else "validation", images, self.global_step)
                self.log(f"{'sample' if final else 'validation'} grid: {path}")
        accelerator.wait_for_everyone()
