"""One training step in each framework, for the training check (`training.py`).

Keras takes its step statelessly (the model keeps its weights), the PyTorch reference on a
copy of the checkpoint; each reports its logits, loss, gradients and weights after one SGD
step, named as that framework names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F

from volo_convert.architecture.keras_model import drop_rates_at_zero
from volo_convert.architecture.variants import VoloConfig
from volo_convert.checks.reference import build_reference
from volo_convert.errors import ConversionError
from volo_convert.native_logs import TRAINING_LINES, known_lines_held_back

GRADIENT_BACKENDS = ("tensorflow", "torch", "jax")


def fixed_labels(batch_size: int, num_outputs: int, seed: int) -> np.ndarray:
    """The seeded class labels both losses are computed against."""
    return np.random.default_rng(seed).integers(num_outputs, size=batch_size)


def _cross_entropy(logits: Any, labels: np.ndarray) -> Any:
    """Mean cross-entropy of B, K logits against B labels, as torch's F.cross_entropy."""
    return keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def _keras_gradients(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> tuple:
    """Training-mode logits, loss, trainable gradients and updated non-trainable values.

    Stateless: the model's variables keep their values.
    """
    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]

    def forward(values: list) -> tuple:
        logits, updates = model.stateless_call(values, non_trainable, images, training=True)
        return _cross_entropy(logits, labels), (logits, updates)

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        values = [tf.convert_to_tensor(value) for value in trainable]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss, (logits, updates) = forward(values)
        return logits, loss, tape.gradient(loss, values), updates
    if backend == "torch":
        values = [value.detach().requires_grad_() for value in trainable]
        loss, (logits, updates) = forward(values)
        gradients = list(torch.autograd.grad(loss, values))
        return logits.detach(), loss.detach(), gradients, [value.detach() for value in updates]
    if backend == "jax":
        import jax

        (loss, (logits, updates)), gradients = jax.jit(jax.value_and_grad(forward, has_aux=True))(
            trainable
        )
        return logits, loss, gradients, updates
    raise ConversionError(
        f"the training check computes gradients under the {', '.join(GRADIENT_BACKENDS)} "
        f"backends, not {backend}"
    )


def to_numpy(value: Any) -> np.ndarray:
    """A Keras backend tensor (or a NumPy array) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(value))


@dataclasses.dataclass(frozen=True)
class TrainingStep:
    """One framework's training step on a batch, each weight named as that framework does.

    `gradients` holds the trainable weights' gradients; `weights_after` every weight after
    the SGD step, the BatchNorm statistics updated by the training forward. Values are
    that framework's tensors, turned into NumPy arrays one at a time when compared.
    """

    logits: np.ndarray
    loss: float
    gradients: Mapping[str, Any]
    weights_after: Mapping[str, Any]


def keras_training_step(
    model: keras.Model, images: np.ndarray, labels: np.ndarray, learning_rate: float
) -> TrainingStep:
    """One SGD step of `model` on B, S, S, 3 images, with drop rates at 0; names are
    Keras paths. Stateless: `model` keeps its weights.
    """
    with known_lines_held_back(TRAINING_LINES):
        with drop_rates_at_zero(model):
            logits, loss, gradients, updates = _keras_gradients(model, images, labels)
        trainable = model.trainable_variables
        # The step is taken on copies, so the model keeps its weights.
        stepped = [keras.Variable(keras.ops.copy(variable.value)) for variable in trainable]
        keras.optimizers.SGD(learning_rate).apply(gradients, stepped)
    after = zip([*trainable, *model.non_trainable_variables], [*stepped, *updates], strict=True)
    return TrainingStep(
        to_numpy(logits),
        float(to_numpy(loss)),
        {variable.path: gradient for variable, gradient in zip(trainable, gradients, strict=True)},
        {variable.path: value for variable, value in after},
    )


def torch_training_step(
    config: VoloConfig,
    state_dict: Mapping[str, torch.Tensor],
    head: str,
    images: np.ndarray,
    labels: np.ndarray,
    learning_rate: float,
    device: torch.device,
) -> TrainingStep:
    """One SGD step of the reference, trained from a copy of `state_dict` in its dtype.

    Names are the checkpoint's tensor names; `images` are B, S, S, 3.
    """
    weights = {key: tensor.detach().clone() for key, tensor in state_dict.items()}
    dtype = weights["pos_embed"].dtype
    reference = build_reference(config, images.shape[1], weights, device, head).train()
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device, dtype)  # B, 3, S, S
    logits = reference(batch)
    loss = F.cross_entropy(logits, torch.from_numpy(labels).to(device))
    loss.backward()
    gradients = {
        key: (parameter.grad if parameter.grad is not None else torch.zeros_like(parameter))
        .cpu()
        .numpy()
        for key, parameter in reference.named_parameters()
    }
    torch.optim.SGD(reference.parameters(), lr=learning_rate).step()
    return TrainingStep(
        logits.detach().cpu().numpy(),
        float(loss.item()),
        gradients,
        {key: tensor.detach().cpu().numpy() for key, tensor in reference.state_dict().items()},
    )
