"""Contract checks for ncpvae components: run them on your plugin in your own tests.

Each check exercises the interface a component promises (shapes, dtypes, devices, seeded
determinism, batch separability, gradients, detached outputs) and raises :class:`AssertionError`
with a one-line message naming the component and what failed. They use plain ``torch`` only (no
pytest, no hypothesis), so they run under any test runner, or in a notebook.

Usage, in a plugin's test file::

    import torch
    import ncpvae
    from ncpvae.plugin_manager import PluginManager
    from ncpvae.testing import check_component_class, check_prior

    import ncpvae_mog.plugin

    def test_mog_prior_contract():
        registry = PluginManager(entrypoints=False, plugins=[ncpvae_mog.plugin]).registry
        check_component_class(registry.get("prior", "mog"))
        prior = ncpvae.create("prior", "mog", latent_dim=4, dtype=torch.float64, registry=registry)
        check_prior(prior, batch_shapes=[(), (5,), (2, 3)])

The checks:

- :func:`check_component_class` -- ``name``, ``kind`` and the pydantic ``Config`` of any class.
- :func:`check_prior` -- ``log_prob``/``energy`` ``(..., D) -> (...)``, ``sample(n) -> (n, D)``,
  seeded determinism, batch separability of the energy, ``energy = -log_prob + const``.
- :func:`check_model` -- ``encode``, ``decode``, ``recon_log_prob`` shapes; gradients flow.
- :func:`check_objective` -- a finite scalar ``"loss"`` with gradients; other entries detached.
- :func:`check_dataset` -- image batches float32 in [0, 1], labels, the ground-truth protocol.
- :func:`check_sampler` -- ``run`` gives ``(S, C, D)`` samples, deterministic with a generator,
  burn-in/thinning select steps of one chain, no autograd graph retained.

A fitted prior (``requires_fit``) must be fitted before :func:`check_prior` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from ncpvae.component import BuildContext, ComponentConfig
from ncpvae.data import DataBundle, DatasetPlugin, GroundTruthData, ImageSource
from ncpvae.model import LatentModel
from ncpvae.objective import Objective
from ncpvae.prior import Prior
from ncpvae.registry import Registry
from ncpvae.sampler import Sampler

__all__ = [
    "check_component_class",
    "check_dataset",
    "check_model",
    "check_objective",
    "check_prior",
    "check_sampler",
    "standard_normal_energy",
]

# --------------------------------------------------------------------------------------------
# helpers


def _describe(component: Any) -> str:
    cls = component if isinstance(component, type) else type(component)
    kind = getattr(cls, "kind", "component")
    name = getattr(cls, "name", "?")
    return f"{kind} '{name}' ({cls.__qualname__})"


def _require(condition: Any, who: str, message: str) -> None:
    # Not `assert`: the checks must also fail under `python -O`.
    if not condition:
        raise AssertionError(f"{who}: {message}")


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing two computations that differ only in summation order."""
    if dtype == torch.float64:
        return 1e-7, 1e-9
    if dtype == torch.float32:
        return 1e-4, 1e-5
    return 1e-2, 1e-3


def _close(a: Tensor, b: Tensor) -> bool:
    rtol, atol = _tolerances(a.dtype)
    scale = 1.0 + float(b.detach().abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol * scale))


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """The dtype and device of the module's first floating parameter or buffer, if any."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None


def _randn(shape: Sequence[int], *, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Drawn on the CPU in float64, then cast: the same numbers on every device and dtype.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _own_global_rng(device: torch.device):
    """Reseed the global RNG inside, restore the caller's RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _all_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def standard_normal_energy(z: Tensor) -> Tensor:
    """``U(z) = |z|^2 / 2``, ``(..., D) -> (...)``: the default target of :func:`check_sampler`."""
    return 0.5 * (z * z).sum(-1)


# --------------------------------------------------------------------------------------------
# every component class


def check_component_class(cls: type, kind: str | None = None, *,
                          example: Mapping[str, Any] | None = None,
                          registry: Registry | None = None) -> None:
    """Check a component class's identity and config contract.

    ``name`` is a non-empty string; ``kind`` matches (when given); ``Config`` subclasses
    :class:`ComponentConfig`, its ``name`` defaults to ``cls.name``, it builds from ``example``
    (values for the fields without defaults; none needed when every field has one), rejects
    another name and unknown keys, round-trips through ``model_dump``, and has a JSON schema.
    ``registry`` validates nested component sections (default: the process-wide registry).
    """
    who = f"{_describe(cls)} class"
    name = getattr(cls, "name", None)
    _require(isinstance(name, str) and name, who, f"needs a non-empty str `name`, got {name!r}")
    if kind is not None:
        _require(getattr(cls, "kind", None) == kind, who,
                 f"kind is {getattr(cls, 'kind', None)!r}, expected {kind!r}")
    config_cls = getattr(cls, "Config", None)
    _require(isinstance(config_cls, type) and issubclass(config_cls, ComponentConfig), who,
             "Config must be a subclass of ncpvae.ComponentConfig")
    _require(config_cls is not ComponentConfig, who,
             "must define its own `class Config(ComponentConfig)` with name: Literal[...]")
    name_field = config_cls.model_fields["name"]
    _require(name_field.default == name, who,
             f"Config.name must default to the class name {name!r}, got {name_field.default!r}")
    schema = config_cls.model_json_schema()
    _require("name" in schema.get("properties", {}), who, "the Config JSON schema lacks `name`")

    example = dict(example or {})
    required = [k for k, f in config_cls.model_fields.items() if f.is_required()]
    missing = [k for k in required if k not in example]
    _require(not missing or example == {}, who,
             f"example lacks the required field(s) {', '.join(missing)}")
    if missing:  # nothing to build it from: the identity checks above are all we can do
        return
    context = {"registry": registry}
    try:
        config = config_cls.model_validate({"name": name, **example}, context=context)
    except ValidationError as exc:
        raise AssertionError(f"{who}: Config does not build from {example or 'its defaults'}: "
                             f"{exc}") from None
    _require(config.name == name, who, f"Config().name is {config.name!r}, expected {name!r}")
    for bad in ({**example, "name": f"{name}-not-this-one"},
                {**example, "name": name, "no_such_key_xyz": 1}):
        try:
            config_cls.model_validate(bad, context=context)
        except ValidationError:
            pass
        else:
            raise AssertionError(f"{who}: Config accepted {bad!r}; it must reject it")
    dumped = config.model_dump()
    _require(config_cls.model_validate(dumped, context=context) == config, who,
             "Config does not round-trip through model_dump()/model_validate()")


# --------------------------------------------------------------------------------------------
# priors


def check_prior(
    prior: Prior,
    *,
    batch_shapes: Iterable[Sequence[int]] = ((), (3,), (2, 4)),
    num_samples: int = 8,
    generator_seed: int = 0,
) -> None:
    """Check a (fitted) prior's interface.

    For each leading ``batch_shape``: ``log_prob`` and ``energy`` map ``(*batch_shape, D)`` to
    ``batch_shape`` with the input's dtype and device, finite, each entry depending on its own
    row only, and ``energy = -log_prob + c`` for one constant ``c``. ``sample(n)`` returns
    ``(n, D)`` finite draws with the prior's dtype and device, identical for two generators seeded
    alike (whatever the global RNG state), different for different seeds. The gradient of
    ``energy(z).sum()`` with respect to row ``i`` equals that of ``energy(z[i:i+1]).sum()`` (a
    ``.mean()`` in the energy fails this). ``kl_from_gaussian``, if not None, is ``(B, D)``,
    finite and non-negative.
    """
    who = _describe(prior)
    _require(isinstance(prior, Prior), who, "is not an ncpvae.Prior")
    dim = prior.latent_dim
    _require(isinstance(dim, int) and dim >= 1, who, f"latent_dim must be an int >= 1, got {dim!r}")
    ref = _dtype_device(prior)
    if ref is None:  # a prior without floating tensors: take what sample() produces
        probe = prior.sample(1)
        ref = (probe.dtype, probe.device)
    dtype, device = ref
    for flag, value in prior.capabilities().items():
        _require(isinstance(value, bool), who, f"capability {flag} must be a bool, got {value!r}")
    _require(isinstance(prior.base_prior, Prior) and prior.base_prior.latent_dim == dim, who,
             "base_prior must be a Prior with the same latent_dim")

    # densities over arbitrary leading batch shapes
    for index, shape in enumerate(batch_shapes):
        shape = tuple(int(s) for s in shape)
        z = _randn((*shape, dim), seed=generator_seed + index, dtype=dtype, device=device)
        z_before = z.clone()
        log_prob, energy = prior.log_prob(z), prior.energy(z)
        _require(torch.equal(z, z_before), who, "log_prob/energy modified their input in place")
        for what, out in (("log_prob", log_prob), ("energy", energy)):
            _require(isinstance(out, Tensor), who, f"{what} must return a Tensor")
            _require(tuple(out.shape) == shape, who,
                     f"{what} of a {tuple(z.shape)} input has shape {tuple(out.shape)}, "
                     f"expected {shape}")
            _require(out.dtype == dtype, who, f"{what} returned {out.dtype} for {dtype} input")
            _require(out.device == z.device, who, f"{what} returned a tensor on {out.device}")
            _require(_all_finite(out), who, f"{what} is not finite for standard normal z")
        offset = (energy + log_prob).detach().reshape(-1)
        if offset.numel():
            _require(_close(offset, offset[:1].expand_as(offset)), who,
                     "energy + log_prob is not constant: energy must be -log_prob up to a "
                     f"constant (spread {_max_diff(offset, offset[:1].expand_as(offset)):.3g})")
        flat = z.reshape(-1, dim)
        if flat.shape[0]:
            energy_flat = prior.energy(flat)
            _require(_close(energy_flat, energy.reshape(-1)), who,
                     "energy of a reshaped batch differs: entries must depend on their own row "
                     f"only (max diff {_max_diff(energy_flat, energy.reshape(-1)):.3g})")

    # batch separability of the energy and of its gradient
    z = _randn((4, dim), seed=generator_seed + 1000, dtype=dtype, device=device).requires_grad_()
    energy = prior.energy(z)
    (grad,) = torch.autograd.grad(energy.sum(), z, allow_unused=True)
    _require(grad is not None, who, "energy does not depend on z (no gradient)")
    _require(_all_finite(grad), who, "the gradient of the energy is not finite")
    for i in range(z.shape[0]):
        row = z.detach()[i : i + 1].clone().requires_grad_()
        energy_row = prior.energy(row)
        (grad_row,) = torch.autograd.grad(energy_row.sum(), row)
        _require(_close(energy.detach()[i : i + 1], energy_row.detach()), who,
                 f"energy of row {i} changes when evaluated alone: rows are not independent")
        _require(_close(grad[i : i + 1], grad_row), who,
                 f"the gradient of energy(z).sum() for row {i} differs from that of row {i} "
                 f"alone (max diff {_max_diff(grad[i : i + 1], grad_row):.3g}): the energy must "
                 "be batch-separable (a .mean() over the batch divides gradients by B)")

    # sampling
    with _own_global_rng(device):
        torch.manual_seed(1)
        first = prior.sample(num_samples, generator=_generator(generator_seed, device))
        torch.manual_seed(2)  # the global RNG must not matter when a generator is given
        second = prior.sample(num_samples, generator=_generator(generator_seed, device))
    other = prior.sample(num_samples, generator=_generator(generator_seed + 1, device))
    _require(isinstance(first, Tensor), who, "sample must return a Tensor")
    _require(tuple(first.shape) == (num_samples, dim), who,
             f"sample({num_samples}) has shape {tuple(first.shape)}, expected ({num_samples}, {dim})")
    _require(first.dtype == dtype, who, f"sample returned {first.dtype}, the prior holds {dtype}")
    _require(first.device == device, who, f"sample returned a tensor on {first.device}, "
             f"the prior lives on {device}")
    _require(_all_finite(first), who, "sample returned non-finite values")
    _require(torch.equal(first, second), who,
             "sample is not reproducible: two generators with the same seed gave different draws "
             "(does it use the global RNG instead of `generator`?)")
    _require(not torch.equal(first, other), who,
             "sample gave identical draws for different generator seeds")
    _require(_all_finite(prior.log_prob(first)), who, "log_prob of the prior's own samples is "
             "not finite")

    kl = prior.kl_from_gaussian(
        _randn((3, dim), seed=generator_seed + 2000, dtype=dtype, device=device),
        _randn((3, dim), seed=generator_seed + 3000, dtype=dtype, device=device).mul(0.5),
    )
    if kl is not None:
        _require(tuple(kl.shape) == (3, dim), who,
                 f"kl_from_gaussian must be per dimension (B, D) = (3, {dim}), got {tuple(kl.shape)}")
        _require(_all_finite(kl), who, "kl_from_gaussian is not finite")
        rtol, atol = _tolerances(dtype)
        _require(bool((kl >= -atol).all()), who, "kl_from_gaussian is negative")


# --------------------------------------------------------------------------------------------
# models


def check_model(model: LatentModel, image_shape: Sequence[int], *, batch_size: int = 3,
                seed: int = 0) -> None:
    """Check a latent model's interface on random images of ``image_shape`` ``(C, H, W)``.

    ``encode`` gives ``(mu, logvar)``, each ``(B, D)``, finite; ``decode`` maps ``(B, D)`` to
    ``(B, C, H, W)`` and ``(2, B, D)`` to ``(2, B, C, H, W)``; ``recon_log_prob`` is ``(B,)``,
    finite, one value per example; in eval mode each example's outputs depend on itself only;
    gradients reach the parameters through both the encoder and the decoder. The model's
    training mode is restored afterwards and no ``.grad`` is written.
    """
    who = _describe(model)
    _require(isinstance(model, LatentModel), who, "is not an ncpvae.LatentModel")
    image_shape = tuple(int(s) for s in image_shape)
    _require(len(image_shape) == 3, who, f"image_shape must be (C, H, W), got {image_shape}")
    ref = _dtype_device(model)
    dtype, device = ref if ref is not None else (torch.float32, torch.device("cpu"))
    dim = model.latent_dim
    b = batch_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *image_shape, generator=generator, dtype=torch.float64).to(device, dtype)

    was_training = model.training
    try:
        model.train()
        mu, logvar = model.encode(x)
        for what, out in (("mu", mu), ("logvar", logvar)):
            _require(tuple(out.shape) == (b, dim), who,
                     f"encode gave {what} of shape {tuple(out.shape)}, expected ({b}, {dim})")
            _require(out.dtype == dtype, who, f"encode gave {what} as {out.dtype}, model is {dtype}")
            _require(_all_finite(out), who, f"encode gave non-finite {what}")
        eps = torch.randn(b, dim, generator=generator, dtype=torch.float64).to(device, dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        params = model.decode(z)
        _require(tuple(params.shape) == (b, *image_shape), who,
                 f"decode of ({b}, {dim}) gave {tuple(params.shape)}, expected {(b, *image_shape)}")
        _require(_all_finite(params), who, "decode gave non-finite values")
        recon = model.recon_log_prob(x, params)
        _require(tuple(recon.shape) == (b,), who,
                 f"recon_log_prob gave shape {tuple(recon.shape)}, expected ({b},): one value "
                 "per example, summed over pixels")
        _require(_all_finite(recon), who, "recon_log_prob is not finite")
        mean = model.mean_image(params.detach())
        _require(tuple(mean.shape) == (b, *image_shape), who, "mean_image changed the shape")

        # gradients: the encoder's parameters through mu/logvar, the decoder's through recon
        params_list = [p for p in model.parameters() if p.requires_grad]
        _require(params_list, who, "has no trainable parameters")
        loss = -recon.sum() + 0.5 * (mu.pow(2) + logvar.exp() - logvar).sum()
        grads = torch.autograd.grad(loss, params_list, allow_unused=True)
        _require(all(g is None or _all_finite(g) for g in grads), who, "non-finite gradients")
        mu2, logvar2 = model.encode(x)
        enc = torch.autograd.grad(mu2.pow(2).sum() + logvar2.pow(2).sum(), params_list,
                                  allow_unused=True)
        _require(any(g is not None and bool(g.abs().sum() > 0) for g in enc), who,
                 "no gradient reaches any parameter through encode()")
        z_leaf = z.detach().clone().requires_grad_()
        recon_z = model.recon_log_prob(x, model.decode(z_leaf)).sum()
        dec = torch.autograd.grad(recon_z, [z_leaf, *params_list], allow_unused=True)
        _require(dec[0] is not None and bool(dec[0].abs().sum() > 0), who,
                 "recon_log_prob(x, decode(z)) has no gradient with respect to z")
        _require(any(g is not None and bool(g.abs().sum() > 0) for g in dec[1:]), who,
                 "no gradient reaches any parameter through decode()/recon_log_prob()")

        # batch independence (eval mode: batch norm may mix a batch while training)
        model.eval()
        with torch.no_grad():
            mu_all, logvar_all = model.encode(x)
            params_all = model.decode(mu_all)
            recon_all = model.recon_log_prob(x, params_all)
            lead = model.decode(torch.stack([mu_all, mu_all.flip(0)]))
            _require(tuple(lead.shape) == (2, b, *image_shape), who,
                     f"decode of (2, {b}, {dim}) gave {tuple(lead.shape)}, expected "
                     f"{(2, b, *image_shape)}: decode maps (..., D) to (..., C, H, W)")
            _require(_close(lead[0], params_all), who,
                     "decode of a (2, B, D) batch differs from decode of its (B, D) slices")
            for i in range(b):
                mu_i, logvar_i = model.encode(x[i : i + 1])
                _require(_close(mu_i, mu_all[i : i + 1]) and _close(logvar_i, logvar_all[i : i + 1]),
                         who, f"encode of example {i} alone differs from its row in the batch")
                recon_i = model.recon_log_prob(x[i : i + 1], params_all[i : i + 1])
                _require(_close(recon_i, recon_all[i : i + 1]), who,
                         f"recon_log_prob of example {i} alone differs from its batch entry")
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# objectives


def check_objective(objective: Objective, model: LatentModel, prior: Prior, batch: Tensor, *,
                    step: int = 0, seed: int = 0) -> None:
    """Check an objective on one ``batch`` ``(B, C, H, W)`` in [0, 1].

    ``check_compatible`` accepts the pair; ``loss`` returns a dict of tensors whose ``"loss"`` is
    a finite scalar with gradients reaching the model's parameters; every other entry is finite
    and detached; with the global RNG seeded alike, two calls give the same loss. The global RNG
    state is restored afterwards and no ``.grad`` is written.
    """
    who = _describe(objective)
    _require(isinstance(objective, Objective), who, "is not an ncpvae.Objective")
    objective.check_compatible(model, prior)
    with _own_global_rng(batch.device):
        torch.manual_seed(seed)
        out = objective.loss(batch, model, prior, step=step)
        torch.manual_seed(seed)
        again = objective.loss(batch, model, prior, step=step)
    _require(isinstance(out, Mapping), who, f"loss() must return a dict, got {type(out).__name__}")
    _require("loss" in out, who, f"loss() must return a 'loss' entry, got keys {sorted(out)}")
    loss = out["loss"]
    _require(isinstance(loss, Tensor) and loss.ndim == 0, who,
             f"'loss' must be a scalar tensor, got shape {tuple(getattr(loss, 'shape', ()))}")
    _require(_all_finite(loss), who, f"'loss' is not finite ({float(loss.detach())})")
    _require(loss.requires_grad, who, "'loss' does not require grad: nothing would be trained")
    _require(torch.equal(loss.detach(), again["loss"].detach()), who,
             "loss is not reproducible with the same global seed")
    for key, value in out.items():
        if key == "loss":
            continue
        _require(isinstance(value, Tensor), who, f"entry '{key}' must be a tensor")
        _require(not value.requires_grad, who, f"entry '{key}' must be detached (only 'loss' "
                 "carries gradients)")
        _require(_all_finite(value), who, f"entry '{key}' is not finite")
    trainable = [p for p in model.parameters() if p.requires_grad]
    _require(trainable, who, f"the model {_describe(model)} has no trainable parameters")
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    _require(any(g is not None and bool(g.abs().sum() > 0) for g in grads), who,
             "'loss' has no gradient with respect to the model's parameters")
    _require(all(g is None or _all_finite(g) for g in grads), who, "non-finite gradients")


# --------------------------------------------------------------------------------------------
# datasets


def _check_source(source: ImageSource, who: str, split: str, batch_size: int) -> tuple[int, ...]:
    _require(isinstance(source, ImageSource), who, f"{split} must be an ncpvae.ImageSource")
    n = len(source)
    _require(n >= 1, who, f"{split} is empty")
    index = torch.arange(min(batch_size, n), dtype=torch.long)
    index = torch.cat([index, torch.tensor([n - 1, 0])])  # the last image, and a repeat
    images = source.get_batch(index)
    _require(isinstance(images, Tensor) and images.ndim == 4, who,
             f"{split}.get_batch must return (B, C, H, W), got {tuple(getattr(images, 'shape', ()))}")
    _require(images.shape[0] == len(index), who,
             f"{split}.get_batch returned {images.shape[0]} images for {len(index)} indices")
    _require(images.dtype == torch.float32, who, f"{split} images are {images.dtype}, not float32")
    _require(_all_finite(images), who, f"{split} images contain NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    _require(lo >= 0.0 and hi <= 1.0, who, f"{split} images lie in [{lo:.3g}, {hi:.3g}], not [0, 1]")
    _require(torch.equal(images[0], images[-1]), who,
             f"{split}.get_batch gave different images for the same index")
    single = source.get_batch(index[1:2] if len(index) > 2 else index[:1])
    _require(torch.equal(single[0], images[1] if len(index) > 2 else images[0]), who,
             f"{split}.get_batch of one index differs from the same index inside a batch")
    shape = tuple(images.shape[1:])
    _require(tuple(source.image_shape) == shape, who,
             f"{split}.image_shape is {tuple(source.image_shape)}, batches are {shape}")
    labels = source.labels
    if labels is not None:
        _require(isinstance(labels, Tensor) and tuple(labels.shape) == (n,), who,
                 f"{split}.labels must be ({n},), got {tuple(getattr(labels, 'shape', ()))}")
        _require(not labels.is_floating_point() and labels.dtype != torch.bool, who,
                 f"{split}.labels must be integer class indices, got {labels.dtype}")
    return shape


def check_dataset(plugin: DatasetPlugin, ctx: BuildContext | None = None, *, batch_size: int = 4,
                  num_factors: int = 5, generator_seed: int = 0) -> DataBundle:
    """Build ``plugin`` and check its :class:`DataBundle`; returns the bundle.

    Train and test batches are float32 ``(B, C, H, W)`` in [0, 1] with one image shape; indexing
    is consistent (the same index gives the same image, alone or in a batch); ``labels`` are
    ``(N,)`` integers when present. A ground-truth dataset follows :class:`GroundTruthData`:
    ``sample_factors(n, generator)`` is ``(n, K)`` long within ``factor_sizes``, reproducible
    with a seeded generator, and ``images_from_factors`` renders ``(n, C, H, W)`` images.
    """
    who = _describe(plugin)
    _require(isinstance(plugin, DatasetPlugin), who, "is not an ncpvae.DatasetPlugin")
    bundle = plugin.build(ctx if ctx is not None else BuildContext())
    _require(isinstance(bundle, DataBundle), who, "build() must return an ncpvae.DataBundle")
    train_shape = _check_source(bundle.train, who, "train", batch_size)
    test_shape = _check_source(bundle.test, who, "test", batch_size)
    _require(train_shape == test_shape, who,
             f"train images are {train_shape} but test images are {test_shape}")
    _require(tuple(bundle.image_shape) == train_shape, who, "bundle.image_shape is wrong")

    truth = bundle.ground_truth
    if truth is not None:
        _require(isinstance(truth, GroundTruthData), who,
                 "ground_truth lacks part of the GroundTruthData protocol (factor_names, "
                 "factor_sizes, sample_factors, images_from_factors)")
        names, sizes = tuple(truth.factor_names), tuple(truth.factor_sizes)
        _require(len(names) == len(sizes) >= 1, who,
                 f"{len(names)} factor_names for {len(sizes)} factor_sizes")
        _require(all(isinstance(s, int) and s >= 1 for s in sizes), who,
                 f"factor_sizes must be ints >= 1, got {sizes}")
        n = num_factors
        factors = truth.sample_factors(n, torch.Generator().manual_seed(generator_seed))
        again = truth.sample_factors(n, torch.Generator().manual_seed(generator_seed))
        _require(isinstance(factors, Tensor) and tuple(factors.shape) == (n, len(sizes)), who,
                 f"sample_factors({n}) must be ({n}, {len(sizes)}), got "
                 f"{tuple(getattr(factors, 'shape', ()))}")
        _require(factors.dtype == torch.long, who, f"factors must be long, got {factors.dtype}")
        _require(torch.equal(factors, again), who,
                 "sample_factors is not reproducible with a seeded generator")
        upper = torch.tensor(sizes)
        _require(bool(((factors >= 0) & (factors < upper)).all()), who,
                 f"sample_factors gave indices outside [0, factor_sizes={sizes})")
        images = truth.images_from_factors(factors)
        _require(isinstance(images, Tensor) and tuple(images.shape) == (n, *train_shape), who,
                 f"images_from_factors gave {tuple(getattr(images, 'shape', ()))}, expected "
                 f"{(n, *train_shape)}")
        _require(images.dtype == torch.float32, who, "images_from_factors must give float32")
        _require(bool(((images >= 0) & (images <= 1)).all()), who,
                 "images_from_factors gave values outside [0, 1]")
    return bundle


# --------------------------------------------------------------------------------------------
# samplers


def _detached(value: Any) -> bool:
    return not (isinstance(value, Tensor) and (value.requires_grad or value.grad_fn is not None))


def check_sampler(
    sampler: Sampler,
    energy: Callable[[Tensor], Tensor] | None = None,
    init_position: Tensor | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    num_steps: int = 6,
    num_chains: int = 3,
    latent_dim: int = 2,
    dtype: torch.dtype = torch.float64,
    generator_seed: int = 0,
) -> None:
    """Check a sampler on ``energy`` (default: :func:`standard_normal_energy`).

    ``init_position`` is ``(C, D)`` (default: ``num_chains`` standard normal draws in
    ``latent_dim`` dims of ``dtype``); ``options`` are the sampler's run options (e.g. the
    ``sir`` sampler's ``proposal``), passed to ``init``, ``step`` and ``run``.

    ``init``/``step`` give NamedTuples without autograd graphs. ``run(energy, init, num_steps,
    generator=g)`` returns a ``SampleResult`` with finite samples ``(S, C, D)`` of the input's
    dtype and device, ``S = ceil((num_steps - burn_in) / thin)``, ``samples[-1]`` the final state,
    ``info`` tensors ``(num_steps, C)``; it is identical for two generators seeded alike (whatever
    the global RNG state), leaves the input unmodified, and returns detached tensors even when
    the input requires grad. Thinning keeps an ordered subset of the same chain's draws.
    """
    who = _describe(sampler)
    _require(isinstance(sampler, Sampler), who, "is not an ncpvae.Sampler")
    energy = energy if energy is not None else standard_normal_energy
    options = dict(options or {})
    if init_position is None:
        init_position = _randn((num_chains, latent_dim), seed=generator_seed, dtype=dtype,
                               device=torch.device("cpu"))
    _require(init_position.ndim == 2, who, f"init_position must be (C, D), got "
             f"{tuple(init_position.shape)}")
    _require(num_steps >= 3, who, "check_sampler needs num_steps >= 3")
    c, d = init_position.shape
    device = init_position.device

    # one step by hand: BlackJAX-style NamedTuples, no graph
    state = sampler.init(init_position.clone(), energy, **options)
    new_state, info = sampler.step(state, energy, generator=_generator(generator_seed, device),
                                   **options)
    for what, value in (("init state", state), ("step state", new_state), ("step info", info)):
        _require(isinstance(value, tuple) and hasattr(value, "_fields"), who,
                 f"{what} must be a NamedTuple, got {type(value).__name__}")
        for field_name, item in zip(value._fields, value):
            _require(_detached(item), who, f"{what}.{field_name} carries an autograd graph")
    _require(tuple(new_state.position.shape) == (c, d), who,
             f"step moved positions to shape {tuple(new_state.position.shape)}, expected {(c, d)}")

    def run(position: Tensor, steps: int, seed: int, **kwargs: Any) -> Any:
        return sampler.run(energy, position, steps, generator=_generator(seed, device),
                           **kwargs, **options)

    original = init_position.clone()
    with _own_global_rng(device):
        torch.manual_seed(1)
        result = run(init_position, num_steps, generator_seed)
        torch.manual_seed(2)  # the global RNG must not matter when a generator is given
        repeat = run(init_position, num_steps, generator_seed)
    _require(torch.equal(init_position, original), who, "run() modified init_position in place")
    for attr in ("samples", "info", "diagnostics"):
        _require(hasattr(result, attr), who, f"run() must return a SampleResult (no .{attr})")
    samples = result.samples
    _require(isinstance(samples, Tensor) and tuple(samples.shape) == (num_steps, c, d), who,
             f"run({num_steps} steps) must give samples ({num_steps}, {c}, {d}), got "
             f"{tuple(getattr(samples, 'shape', ()))}")
    _require(samples.dtype == init_position.dtype, who,
             f"samples are {samples.dtype}, the initial position was {init_position.dtype}")
    _require(samples.device == device, who, f"samples are on {samples.device}, not {device}")
    _require(_all_finite(samples), who, "samples are not finite")
    _require(torch.equal(samples, repeat.samples), who,
             "run() is not reproducible: two generators with the same seed gave different "
             "samples (does it use the global RNG instead of `generator`?)")
    _require(_detached(samples), who, "samples carry an autograd graph")
    _require(isinstance(result.info, Mapping), who, "info must be a dict of tensors")
    for key, value in result.info.items():
        _require(isinstance(value, Tensor) and value.shape[:2] == (num_steps, c), who,
                 f"info['{key}'] must be ({num_steps}, {c}, ...), got "
                 f"{tuple(getattr(value, 'shape', ()))}")
        _require(_detached(value), who, f"info['{key}'] carries an autograd graph")
    _require(isinstance(result.diagnostics, Mapping), who, "diagnostics must be a dict")

    leaf = init_position.detach().clone().requires_grad_()
    with_grad = run(leaf, num_steps, generator_seed)
    _require(_detached(with_grad.samples), who,
             "samples carry an autograd graph when init_position requires grad")
    _require(leaf.grad is None, who, "run() wrote a .grad into init_position")

    # burn-in and thinning: S = ceil((num_steps - burn_in) / thin), a subset of the same chain
    burn_in, thin = 1, 2
    every = run(init_position, num_steps, generator_seed, burn_in=burn_in).samples
    thinned = run(init_position, num_steps, generator_seed, burn_in=burn_in, thin=thin).samples
    expected = -(-(num_steps - burn_in) // thin)
    _require(every.shape[0] == num_steps - burn_in and thinned.shape[0] == expected, who,
             f"num_steps={num_steps}, burn_in={burn_in} kept {every.shape[0]} draws (expected "
             f"{num_steps - burn_in}), with thin={thin} {thinned.shape[0]} (expected {expected})")
    _require(torch.equal(thinned, every.flip(0)[::thin].flip(0)), who,
             f"thin={thin} must keep every {thin}-th draw of the same chain, counted back from "
             "the final state")
