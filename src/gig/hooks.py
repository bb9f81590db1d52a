"""Reach layers by qualified module name: capture their outputs, or run the network from them.

Every analysed layer is seen in *grid form* ``(N, C, H, W)``. A ViT token output ``(N, T, C)``
is laid out as its ``H×W`` grid, with its prefix tokens (class / register tokens) kept apart and
put back untouched when a layer's output is replaced.

Two traps of hook-based tools are checked rather than assumed away:

* a module called more than once per forward (a ReLU reused inside a ResNet block) has no single
  output; choosing it is an error that says so;
* an output modified in place after the hook saw it (``relu_(out)``) would make the captured
  tensor differ from the real one; captured values are cloned at hook time, and a later in-place
  change is reported as an error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError, LayerNotFoundError, LayerUsageError
from .models import ModelBundle, wrap_module


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed layer has run."""


@dataclass
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # output shape for one image, as the module returns it
    grid: tuple[int, int, int]  # (C, H, W)
    prefix_tokens: int = 0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of different batch sizes (relative to the larger entries)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max().clamp_min(1.0)))


def _prefix_tokens(model: nn.Module, n_tokens: int) -> int:
    """Tokens ahead of the square patch grid in a ``(N, T, C)`` output. Found per layer: the
    model's ``num_prefix_tokens`` (class and register tokens) holds only where they have been
    added; a ViT's ``patch_embed`` returns the bare grid."""
    known = getattr(model, "num_prefix_tokens", None)
    candidates = ([known] if isinstance(known, int) else []) + list(range(0, 9))
    for extra in candidates:
        side = math.isqrt(n_tokens - extra) if n_tokens > extra else 0
        if side * side == n_tokens - extra and side > 0:
            return extra
    raise LayerUsageError(f"cannot lay {n_tokens} tokens out as a square grid")


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has; a clear error otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r} is not a device name (cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r}: gig runs on cpu or cuda")
    return device


def _fold_batchnorms(model: nn.Module, keep: set[str], dummy: torch.Tensor) -> int:
    """Fold every ``BatchNorm2d`` whose input is a ``Conv2d``'s output into that convolution, in
    place (eval mode); returns how many. Pairs are found by running ``dummy`` once."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modules = dict(model.named_modules())
    made_by: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, mod in modules.items():
        if isinstance(mod, nn.Conv2d) and name not in keep:
            handles.append(mod.register_forward_hook(lambda _m, _i, out, name=name: made_by.__setitem__(id(out), name)))
        elif type(mod) is nn.BatchNorm2d and name not in keep and mod.track_running_stats:
            handles.append(
                mod.register_forward_pre_hook(
                    lambda _m, inp, name=name: pairs.append((made_by.get(id(inp[0]), ""), name))
                )
            )
    try:
        with torch.no_grad():
            model(dummy)
    finally:
        for h in handles:
            h.remove()
    folded = 0
    for conv, bn in dict.fromkeys(pairs):  # a module run twice gives one pair
        if not conv or pairs.count((conv, bn)) != 1:
            continue
        _set_module(model, conv, fuse_conv_bn_eval(modules[conv], modules[bn]))
        _set_module(model, bn, nn.Identity())
        folded += 1
    return folded


def _fold_zero_padding(model: nn.Module, keep: set[str]) -> int:
    """Move a symmetric ``ZeroPad2d`` held by a convolution as ``static_padding`` (TensorFlow's
    'SAME' padding in the EfficientNet ports) into the convolution's own ``padding``, in place;
    returns how many. The padded copy of the input, and its backward, disappear."""
    folded = 0
    for name, mod in model.named_modules():
        pad = getattr(mod, "static_padding", None)
        if (
            name in keep
            or not isinstance(mod, nn.Conv2d)
            or type(pad) is not nn.ZeroPad2d
            or tuple(mod.padding) != (0, 0)
            or mod.padding_mode != "zeros"
        ):
            continue
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            mod.padding = (top, left)
            mod.static_padding = nn.Identity()
            folded += 1
    return folded


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


class ModelHandle:
    """A classifier with named-layer access.

    ``handle.capture(x, layers)`` returns the logits and each layer's output in grid form;
    ``handle.run_from(x, layer, grid)`` runs the real network with ``layer``'s output replaced;
    ``handle.run_replacing_each(x, layers, replace)`` does both for several layers in one pass.
    """

    def __init__(self, bundle: ModelBundle | nn.Module, device: str | torch.device = "cpu"):
        if isinstance(bundle, nn.Module):
            bundle = wrap_module(bundle)
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._modules = dict(self.model.named_modules())
        self._prefix: dict[str, int] = {}
        self._shares_prefix: dict[tuple, bool] = {}  # per run_from / run_replacing_each key
        #: per run_from key: whether a stand-in input may run the network before the layer
        self._stand_in: dict[tuple, bool] = {}
        #: run_from may replace the images by one small stand-in where that is checked to be exact
        self.stand_in_prefix = True
        #: layout for replacement grids given to :meth:`run_from` (see :meth:`for_gradients`)
        self.memory_format = torch.contiguous_format
        self.folded_batchnorms = 0
        self.folded_paddings = 0
        self._measuring: dict[tuple[str, ...], "ModelHandle"] = {}  # see measuring()

    # ------------------------------------------------------------------ fast copy
    def for_gradients(
        self, layers: list[str], check_input: torch.Tensor | None = None, rtol: float = 1e-4
    ) -> "ModelHandle":
        """A handle on a copy of the model prepared for many gradient evaluations (GIG).

        * every ``BatchNorm2d`` that directly follows a ``Conv2d`` is folded into it (eval mode:
          ``y = γ (conv(x) − μ) / σ + β`` is itself a convolution), unless either module is one
          of ``layers``: the batch norm's forward and backward disappear;
        * a convolution's symmetric static zero padding becomes its own ``padding`` (no padded
          copy of the input);
        * parameters and replacement grids use the channels-last layout, which the CPU (oneDNN)
          and GPU (cuDNN) convolutions run fastest in.

        On EfficientNet-Lite0 this makes a GIG gradient evaluation about 2× faster on the CPU
        (bench/gig_accuracy.py measures it). The copy is checked: its logits and every layer of
        ``layers`` must equal the original's within ``rtol`` (relative L2) on ``check_input``
        (default: two seeded random images); where they do not, the plain copy is returned
        unfolded (a pre-norm tensor read elsewhere, say).
        """
        fast = ModelHandle(dataclasses.replace(self.bundle, model=copy.deepcopy(self.model)), self.device)
        fast._prefix = dict(self._prefix)
        x = (
            check_input
            if check_input is not None
            else torch.randn(
                2, 3, self.bundle.input_size, self.bundle.input_size, generator=torch.Generator().manual_seed(0)
            )
        )
        with torch.no_grad():
            want_logits, want = self.capture(x, layers)
        fast.folded_batchnorms = _fold_batchnorms(fast.model, set(layers), fast.dummy_input(1))
        fast.folded_paddings = _fold_zero_padding(fast.model, set(layers))
        fast.model = fast.model.to(memory_format=torch.channels_last)
        fast._modules = dict(fast.model.named_modules())
        fast.memory_format = torch.channels_last
        with torch.no_grad():
            got_logits, got = fast.capture(x, layers)
        pairs = [(want_logits, got_logits)] + [(want[k], got[k]) for k in layers]
        if any(float((b - a).norm() / a.norm().clamp_min(1e-12)) > rtol for a, b in pairs):
            fast = ModelHandle(self.bundle, self.device)  # unchanged model: exact by construction
        return fast

    def measuring(self, layers: list[str]) -> "ModelHandle":
        """:meth:`for_gradients` of ``layers``, made once per set of layers and kept: the copy
        that passes measuring the model's output with a layer replaced (the decompose stage's
        agreement and KL) run through, about 2× faster on the CPU. The captures that give the
        codes stay on this handle, so codes are unchanged; the copy's outputs match this
        handle's within the check of :meth:`for_gradients`."""
        key = tuple(layers)
        if key not in self._measuring:
            self._measuring[key] = self.for_gradients(list(layers))
        return self._measuring[key]

    # ------------------------------------------------------------------ names
    def module(self, name: str) -> nn.Module:
        """The module called ``name``; unknown names raise with the closest valid names."""
        if name in self._modules and name != "":
            return self._modules[name]
        close = difflib.get_close_matches(name, [n for n in self._modules if n], n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise LayerNotFoundError(f"unknown layer {name!r} in {self.bundle.name}{hint} (see `gig layers`)")

    def check_layers(self, layers: list[str]) -> None:
        for name in layers:
            self.module(name)

    def execution_order(self, layers: list[str]) -> list[str]:
        """``layers`` sorted by when they run in a forward pass, each checked on one dummy
        image before any real image is read: unknown names, layers that do not run or run twice
        (a reused module), outputs changed in place, outputs that are not grids."""
        self.check_layers(layers)
        with torch.no_grad():
            _, grids = self.capture(self.dummy_input(1), layers)
        return list(grids)  # filled by the hooks as the layers ran

    def layer_shapes(self, layers: list[str]) -> dict[str, tuple[int, int, int]]:
        """``{layer: (C, H, W)}`` of each layer's grid at the model's input size (one dummy image)."""
        self.check_layers(layers)
        with torch.no_grad():
            _, grids = self.capture(self.dummy_input(1), layers)
        return {name: tuple(int(d) for d in grids[name].shape[1:]) for name in layers}

    def default_layers(self, n: int = 4) -> list[str]:
        """The layers analysed when none are named: the model's own choice where it has one
        (EfficientNet-Lite0), else the last block of each of the last ``n`` stages, a stage being
        a run of blocks at one resolution; a model whose blocks keep one resolution (a ViT) gets
        ``n`` blocks spread evenly through its depth. A block is a module with children in a
        ``Sequential``/``ModuleList`` beside others of its type (ResNet's ``layer2.3``, timm's
        ``blocks.7``)."""
        if self.bundle.default_layers:
            return list(self.bundle.default_layers)
        infos = {info.name: info for info in self.layer_info()}  # in the order they finish
        candidates = {name for name in infos if self._is_block(name) and min(infos[name].grid[1:]) >= 2}
        # The outermost block only: a block's own sub-blocks (MobileNet's ``features.2.block.0``)
        # are parts of one stage step.
        blocks = [
            name
            for name in infos
            if name in candidates and not any(name.startswith(outer + ".") for outer in candidates)
        ]
        if not blocks:
            raise LayerUsageError(
                f"{self.bundle.name} has no repeated blocks to pick default layers from; name the "
                f"layers to analyse (--layer, config 'layers'; see `gig layers {self.bundle.name}`)"
            )
        stages: list[list[str]] = []
        for name in blocks:
            if stages and infos[stages[-1][-1]].grid[1:] == infos[name].grid[1:]:
                stages[-1].append(name)
            else:
                stages.append([name])
        if len(stages) > 1:
            return [stage[-1] for stage in stages[-n:]]
        only = stages[0]
        picks = sorted({round((k + 1) * len(only) / n) - 1 for k in range(n)})
        return [only[i] for i in picks if i >= 0]

    def _is_block(self, name: str) -> bool:
        module = self._modules[name]
        parent_name, _, _ = name.rpartition(".")
        parent = self._modules.get(parent_name)
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)) or next(module.children(), None) is None:
            return False
        return sum(type(child) is type(module) for child in parent.children()) >= 2

    def layer_info(self) -> list[LayerInfo]:
        """Every module whose output can be analysed (4-D conv maps, 3-D token grids)."""
        shapes: dict[str, tuple] = {}
        calls: dict[str, int] = {}
        handles = []
        for name, mod in self._modules.items():
            if not name:
                continue

            def hook(_m, _i, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape[1:])

            handles.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.model(self.dummy_input(1))
        finally:
            for h in handles:
                h.remove()
        infos = []
        for name, shape in shapes.items():
            if calls.get(name, 0) != 1 or len(shape) not in (2, 3):
                continue
            if len(shape) == 3:
                infos.append(LayerInfo(name, type(self._modules[name]).__name__, shape, shape))
            else:
                tokens, channels = shape
                try:
                    extra = _prefix_tokens(self.model, tokens)
                except LayerUsageError:
                    continue
                side = math.isqrt(tokens - extra)
                infos.append(LayerInfo(name, type(self._modules[name]).__name__, shape, (channels, side, side), extra))
        return infos

    def dummy_input(self, n: int) -> torch.Tensor:
        s = self.bundle.input_size
        return torch.zeros(n, 3, s, s, device=self.device)

    # ------------------------------------------------------------------ grid form
    def to_grid(self, name: str, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Module output → ``(grid (N, C, H, W), prefix tokens (N, E, C) or None)``."""
        if out.dim() == 4:
            return out, None
        if out.dim() != 3:
            raise LayerUsageError(f"layer {name!r} outputs shape {tuple(out.shape)}; need (N,C,H,W) or (N,T,C)")
        n, tokens, channels = out.shape
        if name not in self._prefix:
            self._prefix[name] = _prefix_tokens(self.model, tokens)
        extra = self._prefix[name]
        side = math.isqrt(tokens - extra)
        grid = out[:, extra:, :].transpose(1, 2).reshape(n, channels, side, side)
        return grid, (out[:, :extra, :] if extra else None)

    @staticmethod
    def from_grid(grid: torch.Tensor, prefix: torch.Tensor | None, token_layout: bool) -> torch.Tensor:
        """Inverse of :meth:`to_grid`."""
        if not token_layout:
            return grid
        n, c, h, w = grid.shape
        tokens = grid.reshape(n, c, h * w).transpose(1, 2)
        return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def _hooks(self, hooks: dict[str, object]) -> Iterator[None]:
        handles = [self.module(name).register_forward_hook(fn) for name, fn in hooks.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def grid_until(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """``layer``'s output in grid form ``(N, C, H, W)`` for ``x (N, 3, S, S)``, with the forward
        pass stopped right after it (nothing above the layer runs) and the autograd graph back to
        ``x`` kept: what a gradient of the layer w.r.t. the input (an ERF) needs."""
        return self.grids_until(x, [layer])[layer]

    def grids_until(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`grid_until` of several layers in one forward pass, stopped after the last of them
        to run: ``{layer: grid (N, C, H, W)}``, each with its autograd graph back to ``x``. The
        layers read downstream get a copy of each captured output, so an in-place operation above
        a layer cannot change its grid (the copy's backward passes the gradient through exactly)."""
        grids: dict[str, torch.Tensor] = {}

        def make(name):
            def hook(_m, _i, out):
                if name in grids:  # a module run again: its first output is the layer's, as in grid_until
                    return None
                grids[name] = self.to_grid(name, out)[0]
                if len(grids) == len(set(layers)):
                    raise _StopForward
                return out.clone()

            return hook

        with self._hooks({name: make(name) for name in dict.fromkeys(layers)}):
            try:
                self.model(x.to(self.device))
            except _StopForward:
                return grids
        missing = [name for name in layers if name not in grids]
        raise LayerUsageError(f"layer {missing[0]!r} did not run in a forward pass of {self.bundle.name}")

    def capture(
        self, x: torch.Tensor, layers: list[str], keep_graph: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward ``x (N, 3, S, S)``; return logits ``(N, classes)`` and each layer in grid form.

        With ``keep_graph`` the grids stay connected to the logits, for gradients w.r.t. them
        (the caller then takes ``torch.autograd.grad(score, list(grids.values()))``).
        """
        captured: dict[str, torch.Tensor] = {}
        versions: dict[str, tuple[torch.Tensor, int]] = {}
        calls = {name: 0 for name in layers}

        def make(name):
            def hook(_m, _i, out):
                calls[name] += 1
                if not isinstance(out, torch.Tensor):
                    raise LayerUsageError(f"layer {name!r} returns {type(out).__name__}, not a tensor")
                if keep_graph:
                    # The grid becomes its own node, upstream of everything after the layer, so
                    # gradients w.r.t. it exist (token layouts too); downstream gets a copy, so
                    # in-place ops there cannot change it.
                    grid, prefix = self.to_grid(name, out)
                    grid = grid.clone()
                    if not grid.requires_grad:  # frozen weights and a plain input: start the graph here
                        grid.requires_grad_(True)
                    captured[name] = grid
                    versions[name] = (grid, grid._version)
                    return self.from_grid(grid, prefix, out.dim() == 3).clone()
                grid, _ = self.to_grid(name, out)
                captured[name] = grid.detach().clone()
                versions[name] = (out, out._version)
                return None

            return hook

        with self._hooks({name: make(name) for name in layers}):
            logits = self.model(x.to(self.device))
        for name in layers:
            if calls[name] == 0:
                raise LayerUsageError(f"layer {name!r} did not run in a forward pass of {self.bundle.name}")
            if calls[name] != 1:
                raise LayerUsageError(
                    f"layer {name!r} ran {calls[name]} times in one forward pass (a module reused "
                    "inside its parent, such as a shared ReLU); choose its parent block instead"
                )
            tensor, version = versions[name]
            if tensor._version != version:
                raise LayerUsageError(
                    f"the output of layer {name!r} was modified in place after it was produced; "
                    "its captured value would be wrong: choose its parent block instead"
                )
        return logits, captured

    def run_from(
        self,
        x: torch.Tensor,
        layer: str,
        grid: torch.Tensor,
        read: str | None = None,
        counts: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Run the real network with ``layer``'s output replaced by ``grid``.

        ``x``: images ``(N, 3, S, S)``; ``grid``: ``(M, C, H, W)`` replacements ordered
        image-major, ``counts[n]`` of them for image ``n`` (default: ``M / N`` each). Returns the
        logits ``(M, classes)``, or with ``read`` the grid of that later layer ``(M, C_b, H_b, W_b)``.

        The network before ``layer`` runs once per image and its output batch is widened at the
        hook (the prefix is shared); this is exact whenever nothing after ``layer`` reads a tensor
        from before it. Where that fails (a skip connection around the layer) the images are
        repeated instead. Where, moreover, the images' values and size do not matter after the
        layer (checked on the first call per ``(layer, read)``, see :meth:`_check_stand_in`), one
        small blank image stands in for them (``stand_in_prefix``).
        """
        x = x.to(self.device)
        if counts is None:
            each = grid.shape[0] // x.shape[0]
            if each * x.shape[0] != grid.shape[0]:
                raise ValueError(f"grid batch {grid.shape[0]} is not a multiple of image batch {x.shape[0]}")
            repeats = torch.full((x.shape[0],), each, dtype=torch.long, device=self.device)
        else:
            repeats = torch.as_tensor(counts, dtype=torch.long, device=self.device)
            if repeats.numel() != x.shape[0] or int(repeats.sum()) != grid.shape[0] or bool((repeats < 1).any()):
                raise ValueError(
                    f"counts {repeats.tolist()} do not split {grid.shape[0]} replacements over {x.shape[0]} images"
                )
        key = (layer, read)
        if self.stand_in_prefix and self._stand_in.get(key, True):
            if key in self._stand_in:
                return self._run_replaced(
                    self._stand_in_input(), layer, grid, read, grid.new_tensor([grid.shape[0]], dtype=torch.long)
                )
            out = self._run_from_images(x, layer, grid, read, repeats, key)
            self._check_stand_in(layer, grid, read, key, out)
            return out
        return self._run_from_images(x, layer, grid, read, repeats, key)

    #: side of the stand-in image (see :meth:`_check_stand_in`)
    STAND_IN_SIZE = 32

    def _stand_in_input(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.STAND_IN_SIZE, self.STAND_IN_SIZE, device=self.device)

    def _check_stand_in(self, layer, grid, read, key, want: torch.Tensor) -> None:
        """Whether one small blank image may stand in for the images before ``layer``.

        Where the layer's output is replaced whole and nothing after it reads a tensor (or a
        size) from before it, the images only feed work whose result is thrown away: the network
        before the layer (for a late layer most of it) then runs once on a 32×32 blank image,
        widened at the hook to every replacement, instead of once per image. Checked, not
        assumed: the first call per (layer, read) compares the stand-in's output with the real
        one (a skip connection around the layer, prefix tokens read from the layer's output, or
        a head that uses the input's size differ or fail, and keep the real images)."""
        try:
            with torch.no_grad():
                got = self._run_replaced(
                    self._stand_in_input(),
                    layer,
                    grid.detach(),
                    read,
                    grid.new_tensor([grid.shape[0]], dtype=torch.long),
                )
            self._stand_in[key] = _close(want.detach(), got)
        except Exception:  # noqa: BLE001 — any failure (timm asserts the input size) keeps the images
            self._stand_in[key] = False

    def _run_from_images(self, x, layer, grid, read, repeats, key) -> torch.Tensor:
        """:meth:`run_from` with the images themselves run before the layer."""
        widen = bool((repeats > 1).any())
        if widen and self._shares_prefix.get(key, True):
            try:
                out = self._run_replaced(x, layer, grid, read, repeats)
                self._shares_prefix[key] = True
                return out
            except RuntimeError:  # e.g. a skip from before the layer, or a head that reshapes by N
                self._shares_prefix[key] = False
        if widen:
            x = x.repeat_interleave(repeats, dim=0)
        return self._run_replaced(x, layer, grid, read, None)

    def run_replacing_each(
        self,
        x: torch.Tensor,
        layers: list[str],
        replace,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The network on ``x (N, 3, S, S)`` as it is, and with each of ``layers`` replaced in turn.

        ``replace(layer, grid) → grid``: called exactly once per layer, with the layer's output on
        the unmodified images in grid form ``(N, C, H, W)``, returns its replacement (same shape).
        Returns the logits ``(N, classes)`` of the unmodified network and ``{layer: logits (N,
        classes)}`` with only that layer replaced: what :meth:`capture` followed by one
        :meth:`run_from` per layer gives, in one pass. Since :meth:`run_from` reuses a stand-in for
        the network below the layer, which of the two is faster depends on the batch: on
        EfficientNet-Lite0's four default layers the separate passes are faster at a batch of 16
        (the decompose stage takes them), this pass at a batch of 4 (``bench/decompose_speed.py``).

        One forward pass shares every prefix: at each layer (in execution order) the batch is
        widened by the replacement of that layer's unmodified rows, so the network before the
        first layer runs once, between the first and the second twice, and so on. That is exact
        whenever nothing after a layer reads a tensor from before it (as :meth:`run_from`'s
        shared prefix). It is checked, not assumed: the first call for a set of layers is
        compared with separate :meth:`run_from` passes, and where that fails (or the pass
        raises) these layers always take the separate passes.
        """
        x = x.to(self.device)
        key = ("each", *layers)
        recon: dict[str, torch.Tensor] = {}
        if self._shares_prefix.get(key, True):
            checking = key not in self._shares_prefix
            seen: dict[str, torch.Tensor] | None = {} if checking else None
            try:
                logits, replaced = self._run_chained(x, layers, replace, recon, seen)
            except RuntimeError:
                self._shares_prefix[key] = False
            else:
                if not checking:
                    return logits, replaced
                # The first call: the grids it coded and the logits it gave, against separate passes.
                plain_logits, grids = self.capture(x, layers)
                separate = {layer: self.run_from(x, layer, recon[layer]) for layer in layers}
                pairs = (
                    [(logits, plain_logits)]
                    + [(seen[l], grids[l]) for l in layers]
                    + [(replaced[l], separate[l]) for l in layers]
                )
                self._shares_prefix[key] = all(_close(a, b) for a, b in pairs)
                return plain_logits, separate  # right either way
        # Separate passes; layers the failed shared pass already replaced keep that replacement.
        logits, grids = self.capture(x, layers)
        for layer in layers:
            if layer not in recon:
                recon[layer] = replace(layer, grids[layer])
        return logits, {layer: self.run_from(x, layer, recon[layer]) for layer in layers}

    def _run_chained(self, x, layers, replace, recon, seen) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`run_replacing_each`'s shared pass; fills ``recon`` as it replaces (and ``seen``,
        unless None, with copies of the grids it replaced). Raises ``RuntimeError`` where the
        widened batch does not go through as planned."""
        n = x.shape[0]
        order: list[str] = []

        def make(name):
            def hook(_m, _i, out):
                if not isinstance(out, torch.Tensor) or out.shape[0] != n * (len(order) + 1) or name in order:
                    raise RuntimeError(f"layer {name!r} did not see the widened batch it expected")
                grid, prefix = self.to_grid(name, out[:n])
                if seen is not None:
                    seen[name] = grid.clone()
                if name not in recon:
                    recon[name] = replace(name, grid)
                order.append(name)
                widened = self.from_grid(recon[name].to(out.dtype), prefix, out.dim() == 3)
                return torch.cat([out, widened])

            return hook

        with self._hooks({name: make(name) for name in layers}):
            logits = self.model(x)
        if len(order) != len(layers) or logits.shape[0] != n * (len(layers) + 1):
            raise RuntimeError("not every layer ran once in the widened pass")
        # Rows: the unmodified images, then one block per layer in the order they ran.
        return logits[:n], {name: logits[(i + 1) * n : (i + 2) * n] for i, name in enumerate(order)}

    def _run_replaced(self, x, layer, grid, read, repeats) -> torch.Tensor:
        readout: dict[str, torch.Tensor] = {}

        def replace(_m, _i, out):
            readout["replaced"] = True
            token_layout = out.dim() == 3
            _, prefix = self.to_grid(layer, out)
            if prefix is not None and repeats is not None:
                prefix = prefix.repeat_interleave(repeats, dim=0)
            return self.from_grid(grid.to(out.dtype), prefix, token_layout)

        hooks: dict[str, object] = {layer: replace}
        if read is not None:
            if read == layer:
                raise ValueError("read layer must come after the replaced layer")

            def stop(_m, _i, out):
                if "replaced" not in readout:
                    raise LayerUsageError(f"layer {read!r} runs before {layer!r}; read a later layer")
                readout["grid"] = self.to_grid(read, out)[0]
                raise _StopForward

            hooks[read] = stop
        with self._hooks(hooks):
            try:
                logits = self.model(x)
            except _StopForward:
                return readout["grid"]
        if read is not None:
            raise LayerUsageError(f"layer {read!r} did not run after {layer!r}")
        return logits
