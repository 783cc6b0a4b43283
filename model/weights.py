"""Weights file -> network: the one place a state dict becomes a ``CIFAR100Model``.

The width and class count are read off the weights, so any width loads; loading is strict, so a
file of another network is refused with one clear line. Used by the handler, ``training.evaluate``
and ``training.export``, ``serving.archive`` and the benchmarks' seed-style server.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .network import CIFAR100Model, infer_width_and_classes


class WeightsError(RuntimeError):
    """The weights cannot be turned into a CIFAR100Model; the message says why."""


def read_state_dict(path: str | Path, checkpoint: bool = True) -> dict:
    """The network's state dict from a .pth state dict or a training checkpoint (its EMA weights
    when it has them, as training exports them); ``checkpoint=False`` refuses a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at '{path}'")
    try:
        # weights_only: a .pth from elsewhere must not be able to run code when loaded.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for a bad file
        raise WeightsError(f"'{path}' is not a readable PyTorch weights file ({type(err).__name__}: {err})") from err
    if isinstance(obj, dict) and "model" in obj and "epoch" in obj:  # a training checkpoint
        if not checkpoint:
            raise WeightsError(f"'{path}' is a training checkpoint, not a weights file: pass the CIFAR100_model.pth "
                               f"its run wrote beside it (or make one: {_export_command(path)})")
        obj = obj.get("ema") or obj["model"]
        # AveragedModel's state dict prefixes the network's keys with "module." and adds a counter.
        if "n_averaged" in obj:
            obj = {k.removeprefix("module."): v for k, v in obj.items() if k != "n_averaged"}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _export_command(path: Path) -> str:
    """training.export's command line for a checkpoint. serving.cli is imported here, not at module level:
    model/ is packed into the TorchServe archive without it (serving/archive.py)."""
    try:
        from serving.cli import module_command
    except ImportError:
        return f"python -m training.export {path} OUT.pth"
    return module_command("training.export", path, "OUT.pth")


def network_from_state_dict(state_dict: dict, source: str = "weights") -> CIFAR100Model:
    """A CIFAR100Model of the width and class count the state dict was trained with, loaded strictly
    (float16, bfloat16 and float64 values are cast into the float32 network; integer ones are refused, and so
    are NaN or infinite values: a diverged training run's, whose every answer would be NaN; and finite ones
    that overflow: check_finite_output)."""
    fc = state_dict.get("fc.weight")
    if fc is None or fc.dim() != 2 or fc.shape[1] % 64:
        raise WeightsError(f"{source} are not CIFAR100Model weights: no 'fc.weight' of shape "
                           f"[classes, 64 x width] (keys start {list(state_dict)[:4]})")
    width, num_classes = infer_width_and_classes(state_dict)
    model = CIFAR100Model(width=width, num_classes=num_classes)
    # load_state_dict casts whatever it is given: integer or bool weights would load as a network that answers noise.
    for name, value in model.state_dict().items():
        given = state_dict.get(name)
        if isinstance(given, torch.Tensor) and value.is_floating_point() and not given.is_floating_point():
            raise WeightsError(f"{source} hold '{name}' as {str(given.dtype).removeprefix('torch.')}, not floating "
                               "point: not trained weights (float32, float16, bfloat16 or float64)")
        if isinstance(given, torch.Tensor) and given.is_floating_point() and not torch.isfinite(given).all():
            raise WeightsError(f"{source} hold NaN or infinite values in '{name}' (a training run that diverged?): "
                               "every answer would be NaN")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise WeightsError(f"{source} do not fit CIFAR100Model(width={width}, num_classes={num_classes}): "
                           + " ".join(line.strip() for line in first)) from err
    check_finite_output(model, source)
    return model


PROBE_SIDE = 32  # the probe's blank image: CIFAR's size, what the servers feed the network


def check_finite_output(model: CIFAR100Model, source: str = "weights") -> None:
    """Refuse weights whose every value is finite but whose forward pass is not (a weight scaled to 1e38: every
    logit infinite): they start, then every answer fails while /health says ok. One blank image through the
    network in eval mode must give finite logits (a few ms). Every value 1 (a light grey once normalized), not
    0: zeros stay zeros through a network whose BatchNorm biases are still 0, and would probe nothing."""
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(torch.ones(1, model.input_shape, PROBE_SIDE, PROBE_SIDE))
    finally:
        model.train(was_training)
    if not torch.isfinite(logits).all():
        raise WeightsError(f"{source} give NaN or infinite logits for a blank image although every value is finite "
                           "(weights that overflow: scaled far out of range?): every answer would be NaN")


def check_class_count(num_classes: int, labels: list[str], source: str = "weights") -> None:
    """A server answers with a name for each of the network's classes: weights of another class count are refused
    (TorchServe's handler, KServe's predictor, the archive)."""
    if num_classes != len(labels):
        raise WeightsError(f"{source} are a network of {num_classes} classes, but index_to_name.json names "
                           f"{len(labels)}: these weights cannot be served with these class names")


def load_network(path: str | Path) -> CIFAR100Model:
    """The network a weights file (state dict or training checkpoint) holds, in train mode as built."""
    return network_from_state_dict(read_state_dict(path), f"'{path}'")
