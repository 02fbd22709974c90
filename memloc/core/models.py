"""Model registry: built-in ``mlp``, ``lenet``, ``resnet9``, ``timm:NAME``, ``torchvision:NAME``,
models registered with :func:`register_model`, and import paths ``pkg.module:factory``.

``build_model(spec, in_shape, num_classes, **options)`` returns a fresh, randomly initialised
classifier mapping (B, *in_shape) to (B, num_classes) logits. Nothing is downloaded:
pretrained weights are never requested. A registered / imported factory is called with
``in_shape`` and ``num_classes`` only if its signature names them, plus ``options``.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .errors import MemlocError
from .runtime import import_object

__all__ = ["MLP", "LeNet", "ResNet9", "MODELS", "build_model", "register_model", "model_name_of", "import_path_of",
           "spec_name"]


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] x len(hidden) -> Linear. Layers named ``fc1, fc2, ..., head``."""

    def __init__(self, in_shape, num_classes: int, hidden=(512, 512)):
        super().__init__()
        self.flatten = nn.Flatten()
        sizes = [math.prod(in_shape), *hidden]
        for i, (a, b) in enumerate(zip(sizes, sizes[1:]), 1):
            self.add_module(f"fc{i}", nn.Linear(a, b))
            self.add_module(f"act{i}", nn.ReLU())
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


class LeNet(nn.Module):
    """LeNet-5: conv(6,5)-pool-conv(16,5)-pool-fc(120)-fc(84)-fc(C), ReLU, 'same' first conv."""

    def __init__(self, in_shape, num_classes: int, width: int = 1):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6 * width, 16 * width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, c, h, w)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(n, 120 * width), nn.ReLU(), nn.Linear(120 * width, 84 * width), nn.ReLU(),
            nn.Linear(84 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(cin, cout, pool=False):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.res1, self.res2 = _conv_bn(c, c), _conv_bn(c, c)

    def forward(self, x):
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """The ResNet-9 of Maini et al. (after Page's DAWNBench net), widths w, 2w, 4w, 8w.

    prep conv-bn-relu(w); layer1 conv-bn-relu-pool(2w) + residual; layer2 conv-bn-relu-pool(4w);
    layer3 conv-bn-relu-pool(8w) + residual; global max-pool; linear; logits scaled by 0.125.
    """

    def __init__(self, in_shape, num_classes: int, width: int = 64):
        super().__init__()
        w = width
        self.prep = _conv_bn(in_shape[0], w)
        self.layer1 = nn.Sequential(_conv_bn(w, 2 * w, pool=True), _Residual(2 * w))
        self.layer2 = _conv_bn(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(_conv_bn(4 * w, 8 * w, pool=True), _Residual(8 * w))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = 0.125

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.linear(self.flatten(self.pool(x))) * self.scale


def _timm(name, in_shape, num_classes, **options):
    import timm
    if name not in timm.list_models():
        raise MemlocError(f"unknown timm model {name!r} (see timm.list_models())")
    kw = dict(pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **options)
    try:
        return timm.create_model(name, img_size=tuple(in_shape[1:]), **kw)
    except TypeError:  # models without an img_size argument (CNNs)
        return timm.create_model(name, **kw)


def _adapt_in_chans(model: nn.Module, in_chans: int) -> None:
    """Replace the first 3-channel conv of a torchvision model by one taking ``in_chans``."""
    if in_chans == 3:
        return
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, child_name, nn.Conv2d(
                    in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return
    raise MemlocError(f"cannot adapt {type(model).__name__} to {in_chans} input channels")


def _torchvision(name, in_shape, num_classes, **options):
    import torchvision
    if name not in torchvision.models.list_models():
        raise MemlocError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
    kw = dict(weights=None, num_classes=num_classes, **options)
    if name.startswith(("vit_", "swin_", "maxvit")):
        kw.setdefault("image_size", in_shape[1])
    try:
        model = torchvision.models.get_model(name, **kw)
    except TypeError:
        kw.pop("image_size", None)
        model = torchvision.models.get_model(name, **kw)
    _adapt_in_chans(model, in_shape[0])
    return model


MODELS = {"mlp": MLP, "lenet": LeNet, "resnet9": ResNet9}
_REGISTERED: dict = {}


def register_model(name: str):
    """Decorator: ``@memloc.register_model("mynet")`` on a model class or a factory function.

    Runs recorded with ``model_spec="mynet"`` (or from an instance of a registered class) rebuild
    the model by name in every analysis and command, as long as the defining module is imported
    (from the command line, give the import path ``pkg.module:factory`` instead).
    """
    def deco(factory):
        if name in MODELS or ":" in name:
            raise MemlocError(f"model name {name!r} is built in or contains ':'; choose another")
        _REGISTERED[name] = factory
        return factory
    return deco


def import_path_of(name: str) -> str | None:
    """``module:qualname`` of a registered factory, if another process could import it."""
    factory = _REGISTERED.get(name)
    module = getattr(factory, "__module__", None)
    if factory is None or module in (None, "__main__") or "<locals>" in getattr(factory, "__qualname__", "<locals>"):
        return None
    return f"{module}:{factory.__qualname__}"


def spec_name(spec: dict) -> str:
    """The name to build a recorded model spec with: its registered name if registered in this
    process, else the import path recorded beside it (so commands in a fresh process work)."""
    name = spec["spec"]
    if name in _REGISTERED or name in MODELS or ":" in name or not spec.get("import"):
        return name
    return spec["import"]


def model_name_of(model: nn.Module) -> str | None:
    """The registered name of ``model``'s class, if it was registered as a class."""
    for name, factory in _REGISTERED.items():
        if factory is type(model):
            return name
    return None


def _call_factory(factory, spec, in_shape, num_classes, options):
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kw = dict(options)
    if "in_shape" in params:
        kw["in_shape"] = in_shape
    if "num_classes" in params:
        kw["num_classes"] = num_classes
    try:
        model = factory(**kw)
    except TypeError as e:
        raise MemlocError(f"bad options for model {spec!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise MemlocError(f"model factory {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build_model(spec: str, in_shape, num_classes: int, **options) -> nn.Module:
    """A fresh classifier (see :func:`_build`); a model that cannot take ``in_shape`` is one clear error."""
    try:
        return _build(spec, in_shape, num_classes, **options)
    except RuntimeError as e:
        raise MemlocError(f"model {spec!r} cannot be built for inputs of shape {tuple(in_shape or ())} "
                          f"({str(e).splitlines()[0][:200]})", argument="model") from None
    except TypeError as e:   # unknown options (e.g. a run.json edited by hand) reach timm / torchvision
        raise MemlocError(f"bad options for model {spec!r}: {e}") from None


def _build(spec: str, in_shape, num_classes: int, **options) -> nn.Module:
    """A fresh classifier. ``spec``: ``mlp``, ``lenet``, ``resnet9``, ``timm:NAME``,
    ``torchvision:NAME``, a :func:`register_model` name or ``pkg.module:factory``.

    ``options`` go to the constructor (``width`` for lenet/resnet9, ``hidden`` for mlp, timm kwargs...).
    """
    in_shape = tuple(int(s) for s in in_shape) if in_shape is not None else None
    valid = f"{', '.join(MODELS)}, timm:NAME, torchvision:NAME, a registered name or pkg.module:factory"
    if spec in _REGISTERED:
        return _call_factory(_REGISTERED[spec], spec, in_shape, num_classes, options)
    prefix, _, name = spec.partition(":")
    if name:
        factories = {"timm": _timm, "torchvision": _torchvision}
        if prefix in factories:
            return factories[prefix](name, in_shape, num_classes, **options)
        if not _importable(prefix):
            raise MemlocError(f"unknown model family or module {prefix!r}; valid: {valid}")
        return _call_factory(import_object(spec, "model factory"), spec, in_shape, num_classes, options)
    if spec not in MODELS:
        raise MemlocError(f"unknown model {spec!r}; valid: {valid} (a memloc.register_model name is known only "
                          "in a process that imported the module registering it)")
    try:
        return MODELS[spec](in_shape, num_classes, **options)
    except TypeError as e:
        raise MemlocError(f"bad options for model {spec!r}: {e}") from None
