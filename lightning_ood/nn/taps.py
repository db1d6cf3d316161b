"""Read what the detectors need from any network's own forward pass, with hooks.

Plain torch, no wrapper code around the user's network:

- **pooled features**: the (flattened) **input of the head module**, read by a forward
  pre-hook, so a network that pools functionally (``F.avg_pool2d`` in ``forward``, as
  akamaster's CIFAR ResNets) needs nothing but the head's name; or, as an override, the
  flattened **output** of a named ``penultimate`` module;
- **blocks**: a list of modules whose outputs are reduced (FeatureNorm,
  :func:`lightning_ood.detectors.functional.feature_norm`) by forward hooks as soon as each
  is produced, so no feature map is kept. :func:`resolve_blocks` chooses them from a spec.

The hooks are registered for the duration of one forward pass only
(:meth:`Taps.capture`), and what they capture goes into a plain Python object
(:class:`Capture`), never into module attributes: a network with taps exports with
``torch.export`` (non-strict) and compiles as it is, and a network between two passes
carries no hooks (it pickles, deep-copies and is ``torch.compile``-d untouched).

The project's own :class:`~lightning_ood.nn.classifier.Classifier` and the post-hoc
adapter :class:`~lightning_ood.lightning.posthoc.PostHocClassifier` both read their block
norms through :class:`Taps`: one way to get block outputs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ood.detectors.functional import feature_norm

#: Class names of residual blocks found by ``blocks: auto``: torchvision (ResNet
#: ``BasicBlock``/``Bottleneck``, ConvNeXt ``CNBlock``, MobileNet/ShuffleNet
#: ``InvertedResidual``, EfficientNet ``MBConv``/``FusedMBConv``, RegNet
#: ``ResBottleneckBlock``), timm (ResNet/RegNet ``BasicBlock``/``Bottleneck``, ResNetV2
#: ``PreActBasic``/``PreActBottleneck``, ``ConvNeXtBlock``, EfficientNet/MobileNet
#: ``DepthwiseSeparableConv``/``InvertedResidual``/``EdgeResidual``, byob/CSP
#: ``BottleneckBlock``/``DarkBlock``) and the usual CIFAR code (akamaster's and kuangliu's
#: ``BasicBlock``/``Bottleneck``/``PreActBlock``, WideResNet ``wide_basic``/``WideBasic``).
#: Blocks whose output is a (B, C, H, W) feature map; transformer blocks (B, N, C) are not
#: listed.
KNOWN_BLOCK_CLASSES: tuple[str, ...] = (
    "BasicBlock", "Bottleneck", "PreActBlock", "PreActBasic", "PreActBasicBlock", "PreActBottleneck",
    "ResBottleneckBlock", "BottleneckBlock", "DarkBlock", "CNBlock", "ConvNeXtBlock", "InvertedResidual",
    "DepthwiseSeparableConv", "EdgeResidual", "MBConv", "FusedMBConv", "wide_basic", "WideBasic",
)

#: ``blocks=`` values: ``"auto"``, ``"none"``/``None``/``[]``, a module name, a glob pattern,
#: a class name, or a list of those.
BlockSpec = Union[str, Sequence[str], None]


def _outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those nested inside another of them (order kept)."""
    chosen = set(names)
    return [n for n in names if not any(n.startswith(other + ".") for other in chosen if other != n)]


def _class_names(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _module_overview(network: nn.Module) -> str:
    """Some module names (the first two levels) and the class names present, for errors."""
    names = [n for n, _ in network.named_modules() if n and n.count(".") <= 1]
    classes: list[str] = []
    for _, module in network.named_modules():
        name = type(module).__name__
        if name not in classes:
            classes.append(name)
    return f"some of its modules: {names[:16]}; its module classes: {classes[:16]}"


def resolve_blocks(network: nn.Module, spec: BlockSpec = "auto") -> list[str]:
    """The names (as in ``network.named_modules()``) of the blocks ``spec`` selects.

    Rules:

    - ``"auto"``: every module whose class name is in :data:`KNOWN_BLOCK_CLASSES`,
      keeping the **outermost** matches (a block nested in another block is dropped), in
      ``named_modules()`` order (registration order, which is the forward order of
      torchvision, timm and the usual CIFAR networks). None found: ``[]`` (FeatureNorm
      is then skipped with a reason).
    - ``"none"``, ``None`` or ``[]``: no blocks.
    - a string that is a module name (``"layer3.1"``): that module.
    - a string with ``*``, ``?`` or ``[``: a glob pattern matched with
      :func:`fnmatch.fnmatchcase` on the module names (``*`` also crosses dots), keeping the
      outermost matches in ``named_modules()`` order: ``"layer*.*"`` gives ``layer1.0``,
      ``layer1.1``, ... of a ResNet (``layer1.0.conv1`` is inside ``layer1.0``).
    - any other string: a class name (``"BasicBlock"``, ``"Bottleneck"``,
      ``"ConvNeXtBlock"``; or the qualified ``"torchvision.models.resnet.BasicBlock"``),
      outermost matches in ``named_modules()`` order.
    - a list of those: each item resolved by the rules above, concatenated in the list's
      order, duplicates dropped.

    Raises:
        ValueError: an item (other than ``auto``) matches no module; the message lists
            module and class names of the network.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"blocks must be 'auto', a module name, a glob pattern, a class name or a list of those; "
                        f"got {spec!r}")
    modules = [(name, module) for name, module in network.named_modules() if name]
    module_names = {name for name, _ in modules}
    chosen: list[str] = []
    for item in items:
        if item.lower() == "none":
            continue
        if item.lower() == "auto":
            matched = _outermost([n for n, m in modules if type(m).__name__ in KNOWN_BLOCK_CLASSES])
        elif item in module_names:
            matched = [item]
        elif any(c in item for c in "*?["):
            matched = _outermost([n for n, _ in modules if fnmatchcase(n, item)])
            if not matched:
                raise ValueError(f"blocks: the pattern {item!r} matches no module name of {type(network).__name__} "
                                 f"(glob on named_modules() names, e.g. 'layer*.*'); {_module_overview(network)}")
        else:
            matched = _outermost([n for n, m in modules if item in _class_names(m)])
            if not matched:
                raise ValueError(f"blocks: {item!r} is neither a module name nor a module class of "
                                 f"{type(network).__name__} (give module names, a glob pattern such as 'layer*.*', "
                                 f"a class name, or 'auto'); {_module_overview(network)}")
        chosen.extend(n for n in matched if n not in chosen)
    return chosen


class Capture:
    """What the taps read during one forward pass (a plain container, one per pass).

    Attributes:
        inputs: the flattened (B, D) features of the last call of the feature module, or
            ``None`` if it did not run.
        feature_calls: how many times the feature module ran.
        block_values: per block, ``reduce`` of its output (``None`` until it runs).
        block_calls: per block, how many times it ran.
    """

    def __init__(self, num_blocks: int) -> None:
        self.inputs: Optional[Tensor] = None
        self.feature_calls = 0
        self.block_values: list[Optional[Tensor]] = [None] * num_blocks
        self.block_calls = [0] * num_blocks


class Taps:
    """Hooks that read pooled features and per-block reductions from a forward pass.

    Args:
        features: ``(name, module, "input" | "output")``: read the features as the
            flattened first input of ``module`` (a forward pre-hook; the head) or as its
            flattened output (a forward hook; an explicit penultimate module). ``None``:
            no features (the caller has them, e.g. a backbone's own output).
        blocks: ``(name, module)`` pairs, in the order of the block norms.
        reduce: applied to each block's output, (B, M, H, W) -> (B,); default FeatureNorm.

    Use::

        with taps.capture(blocks=True) as captured:
            logits = network(x)
        features, norms = taps.features(captured), taps.block_norms(captured)  # (B, D), (B, K)
    """

    def __init__(
        self,
        features: Optional[tuple[str, nn.Module, Literal["input", "output"]]] = None,
        blocks: Sequence[tuple[str, nn.Module]] = (),
        reduce: Callable[[Tensor], Tensor] = feature_norm,
    ) -> None:
        if features is not None and features[2] not in ("input", "output"):
            raise ValueError(f"features are read from a module's 'input' or 'output', got {features[2]!r}")
        self.feature_tap = features
        self.blocks = list(blocks)
        self.reduce = reduce

    @classmethod
    def on(cls, network: nn.Module, head: Optional[str] = None, penultimate: Optional[str] = None,
           blocks: BlockSpec = "auto", reduce: Callable[[Tensor], Tensor] = feature_norm) -> "Taps":
        """Taps on a network by module names: features from ``penultimate``'s output when
        given, else from ``head``'s input; blocks resolved by :func:`resolve_blocks`."""
        modules = dict(network.named_modules())
        for role, name in (("head", head), ("penultimate", penultimate)):
            if name is not None and (name == "" or name not in modules):
                raise ValueError(f"{type(network).__name__} has no {role} module {name!r}; "
                                 f"{_module_overview(network)}")
        feature_tap: Optional[tuple[str, nn.Module, Literal["input", "output"]]] = None
        if penultimate is not None:
            feature_tap = (penultimate, modules[penultimate], "output")
        elif head is not None:
            feature_tap = (head, modules[head], "input")
        names = resolve_blocks(network, blocks)
        return cls(feature_tap, [(name, modules[name]) for name in names], reduce)

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @contextlib.contextmanager
    def capture(self, blocks: bool = True) -> Iterator[Capture]:
        """Hooks on the feature module (and, with ``blocks``, on every block) for the
        forward pass run inside the ``with``; removed on exit, also on errors."""
        captured = Capture(self.num_blocks)
        handles = []
        try:
            if self.feature_tap is not None:
                name, module, where = self.feature_tap
                if where == "input":
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, kwargs: self._keep_input(captured, name, args, kwargs), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(
                        lambda m, args, output: self._keep_output(captured, name, output)))
            if blocks:
                for index, (name, module) in enumerate(self.blocks):
                    handles.append(module.register_forward_hook(self._block_hook(captured, index, name)))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _flat(value: Any, what: str) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() < 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{what} is not a (B, ...) tensor: {shape}")
        return torch.flatten(value, 1) if value.dim() > 1 else value[:, None]

    def _keep_input(self, captured: Capture, name: str, args: tuple, kwargs: dict) -> None:
        value = args[0] if args else next(iter(kwargs.values()), None)
        captured.inputs = self._flat(value, f"the input of the head module {name!r}")
        captured.feature_calls += 1

    def _keep_output(self, captured: Capture, name: str, output: Any) -> None:
        captured.inputs = self._flat(output, f"the output of the penultimate module {name!r}")
        captured.feature_calls += 1

    def _block_hook(self, captured: Capture, index: int, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"block {name!r} ({type(module).__name__}) gives {shape}, not a (B, C, H, W) feature "
                                 "map: FeatureNorm reads convolutional blocks; choose others with blocks: [names] or a "
                                 "class name, or blocks: none")
            captured.block_values[index] = self.reduce(output)
            captured.block_calls[index] += 1
        return hook

    def features(self, captured: Capture) -> Tensor:
        """The (B, D) features of the pass; a clear error when the feature module did not run."""
        if captured.inputs is None:
            assert self.feature_tap is not None, "these taps read no features"
            name, module, where = self.feature_tap
            role = "head" if where == "input" else "penultimate"
            raise ValueError(f"the {role} module {name!r} ({type(module).__name__}) did not run in the network's "
                             f"forward pass, so there are no features: name the module the forward pass calls last "
                             f"(head: ...)")
        return captured.inputs

    def block_norms(self, captured: Capture) -> Optional[Tensor]:
        """(B, K) reductions of the K blocks in order, ``None`` when there are no blocks.

        Raises a clear error when a block did not run, or ran more than once, in the pass."""
        if not self.blocks:
            return None
        wrong = [f"{name!r} ran {calls} times" for (name, _), calls in zip(self.blocks, captured.block_calls)
                 if calls != 1]
        if wrong:
            raise ValueError(f"each block must run once per forward pass: {', '.join(wrong[:5])}; choose blocks that "
                             f"do (blocks: [names]), or blocks: none")
        return torch.stack([value for value in captured.block_values if value is not None], dim=1)
