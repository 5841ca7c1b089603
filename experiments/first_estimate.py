r"""Two first estimates for the train-mode needle of ResNet-18 (issue 12, item 3): neither reaches it.

    python -m experiments.first_estimate --method=features            # analytic: the head's exact features
    python -m experiments.first_estimate --method=learned --data_dir=../shared/data

The setting of both: ResNet-18 at initialisation (seed 0), CIFAR-10, one
image per batch (B = 1), SGD, the gradient of one worker with its own
BatchNorm statistics (``--modes``: train, what training sends; eval, the
running averages).

* ``features``: at B = 1 the head's gradient is f (p - y)^T, so the
  penultimate features are f = dW db / |db|^2, exactly (checked against the
  forward pass). The attack matches them, 1 - cos(f(x), f), from noise with
  Geiping's optimiser (signed Adam, lr 0.1 with its schedule, TV 1e-4,
  pixels boxed) for ``--iterations``, on the first ``--images`` images of the
  seed-0 order of the bundled sample.
* ``learned``: a decoder in the manner of Wu et al. (2023, "Learning to
  Invert") at the scale this CPU affords: from the norm-scaled gradients of
  the stem convolution, every BatchNorm scale and bias and the head (16,458
  numbers) to the image, fitted on ``--aux`` CIFAR-10 images of the npz
  directory that are not in the bundled sample, by kernel ridge regression
  (dual form, several lambda) and by a 2-layer MLP; scored on the first 16
  images of the seed-0 order of the bundled sample (the grid's victims come
  first). The mean image scores about 0.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from trustsgd_jax import data, metrics, models
from trustsgd_jax.attacks import objectives

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "features", ["features", "learned"], "which first estimate")
flags.DEFINE_list("modes", ["train", "eval"], "BatchNorm modes of the victim's gradient")
flags.DEFINE_integer("images", 2, "features: victim images (the seed-0 order's first)")
flags.DEFINE_integer("iterations", 1000, "features: attack iterations")
flags.DEFINE_integer("aux", 4000, "learned: auxiliary training images")
flags.DEFINE_integer("epochs", 10, "learned: MLP epochs")
flags.DEFINE_string("data_dir", None, "learned: directory of cifar10.npz (default $TRUSTSGD_DATA_DIR)")


def _setting():
    model = models.make_model("resnet18", 10)
    return model, models.init_variables(model, jax.random.key(0), (32, 32, 3))


def _features_and_logits(model, variables, x, train: bool):
    """The head's input (the penultimate features) and the logits."""
    seen = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen["f"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        if train:
            logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, x, train=False)
    return seen["f"], logits


def _param_grads(model, variables, x, y, train: bool):
    def loss(p):
        _, logits = _features_and_logits(model, {**variables, "params": p}, x, train)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(variables["params"])


def _geiping(loss_fn, x, iterations: int):
    """Signed Adam, lr 0.1 divided by 10 at 3/8, 5/8 and 7/8, TV 1e-4, pixels boxed (as `attacks.gradinv`)."""
    lo, hi = (jnp.asarray(v, jnp.float32) for v in data.pixel_bounds("cifar10"))
    t = iterations
    schedule = optax.piecewise_constant_schedule(0.1, {int(t * 3 / 8): 0.1, int(t * 5 / 8): 0.1, int(t * 7 / 8): 0.1})
    opt = optax.chain(optax.stateless(lambda u, p=None: jax.tree.map(jnp.sign, u)), optax.adam(schedule))

    @jax.jit
    def chunk(x, state):
        def step(carry, _):
            x, state = carry
            g = jax.grad(lambda z: loss_fn(z) + 1e-4 * objectives.total_variation(z))(x)
            u, state = opt.update(g, state, x)
            return (jnp.clip(optax.apply_updates(x, u), lo, hi), state), None

        return jax.lax.scan(step, (x, state), None, length=100)[0]

    state = opt.init(x)
    for _ in range(t // 100):
        x, state = chunk(x, state)
    return x


def features(model, variables) -> None:
    ds = data.load("cifar10", source="sample")
    order = np.random.default_rng(0).permutation(len(ds.x_train))
    for mode in FLAGS.modes:
        train = mode == "train"
        scores = []
        for j in range(FLAGS.images):
            x0 = jnp.asarray(data.normalize(ds.x_train[order[j]][None], "cifar10"))
            y0 = jnp.asarray(ds.y_train[order[j]][None].astype(np.int32))
            head = _param_grads(model, variables, x0, y0, train)["fc"]
            f_wire = head["kernel"] @ head["bias"] / jnp.dot(head["bias"], head["bias"])
            f_true = _features_and_logits(model, variables, x0, train)[0][0]
            err = float(jnp.max(jnp.abs(f_wire - f_true)) / jnp.max(jnp.abs(f_true)))

            def distance(z, train=train, f_wire=f_wire):
                f = _features_and_logits(model, variables, z, train)[0][0]
                return 1 - jnp.dot(f, f_wire) / (jnp.linalg.norm(f) * jnp.linalg.norm(f_wire) + 1e-12)

            t0 = time.time()
            x = _geiping(distance, jax.random.normal(jax.random.key(100 + j), x0.shape), FLAGS.iterations)
            ssim = float(metrics.ssim(np.asarray(x0), np.asarray(x))[0])
            scores.append(ssim)
            print(
                f"{mode} image {order[j]}: features from the head's gradient off by {err:.1e} (relative); "
                f"1 - cos {float(distance(x)):.5f}, SSIM {ssim:.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        print(f"{mode}: mean SSIM {np.mean(scores):.3f} over {len(scores)} images", flush=True)


def _gradient_code(model, variables, train: bool):
    """x, y -> the norm-scaled gradients of the stem, every BatchNorm and the head, concatenated (one image)."""

    def code(x, y):
        g = _param_grads(model, variables, x[None], y[None], train)
        parts = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if "stem_conv" in name or "BatchNorm_0" in name or name.startswith("fc"):
                parts.append(leaf.reshape(-1) / (jnp.linalg.norm(leaf) + 1e-12))
        return jnp.concatenate(parts)

    batched = jax.jit(jax.vmap(code))

    def run(x, y):
        return np.concatenate([np.asarray(batched(x[i : i + 64], y[i : i + 64])) for i in range(0, len(x), 64)])

    return run


def learned(model, variables) -> None:
    bundled = data.load("cifar10", source="sample")
    order = np.random.default_rng(0).permutation(len(bundled.x_train))
    victims_x = data.normalize(bundled.x_train[order[:16]], "cifar10")
    victims_y = bundled.y_train[order[:16]].astype(np.int32)
    aux = data.load("cifar10", source="npz", data_dir=FLAGS.data_dir)
    bundled_bytes = {x.tobytes() for x in bundled.x_train}
    keep = np.array([x.tobytes() not in bundled_bytes for x in aux.x_train])
    aux_x = data.normalize(aux.x_train[keep][: FLAGS.aux], "cifar10")
    aux_y = aux.y_train[keep][: FLAGS.aux].astype(np.int32)
    print(f"auxiliary images: {len(aux_x)} of {keep.sum()} not in the bundled sample", flush=True)
    for mode in FLAGS.modes:
        code = _gradient_code(model, variables, mode == "train")
        t0 = time.time()
        g, gv = code(jnp.asarray(aux_x), jnp.asarray(aux_y)), code(jnp.asarray(victims_x), jnp.asarray(victims_y))
        print(f"{mode}: gradient codes {g.shape} in {time.time() - t0:.0f} s", flush=True)
        mu, sd = g.mean(0), g.std(0) + 1e-8
        g, gv = (g - mu) / sd, (gv - mu) / sd
        n_val = len(g) // 10  # held-out auxiliary images
        gt, xt = g[n_val:].astype(np.float64), aux_x[n_val:].reshape(len(g) - n_val, -1).astype(np.float64)
        x_mean = xt.mean(0)
        gram = gt @ gt.T
        for lam in (1e1, 1e2, 1e3, 1e4, 1e5):
            alpha = np.linalg.solve(gram + lam * np.eye(len(gram)), xt - x_mean)
            rec_v = (gv @ gt.T @ alpha + x_mean).reshape(victims_x.shape)
            rec_h = (g[:n_val] @ gt.T @ alpha + x_mean).reshape(aux_x[:n_val].shape)
            print(
                f"{mode} ridge lambda {lam:g}: SSIM victims {metrics.ssim(victims_x, rec_v).mean():.3f}, "
                f"held-out auxiliary {metrics.ssim(aux_x[:n_val], rec_h).mean():.3f}",
                flush=True,
            )
        _mlp(mode, g[n_val:], aux_x[n_val:], gv, victims_x)


class _Decoder(nn.Module):
    @nn.compact
    def __call__(self, g):
        h = nn.relu(nn.Dense(1024)(g))
        h = nn.relu(nn.Dense(1024)(h))
        return nn.Dense(32 * 32 * 3)(h).reshape(-1, 32, 32, 3)


def _mlp(mode, g, x, gv, victims_x) -> None:
    decoder = _Decoder()
    params = decoder.init(jax.random.key(1), g[:1])
    opt = optax.adamw(1e-3, weight_decay=1e-4)
    state = opt.init(params)

    @jax.jit
    def step(params, state, g, x):
        grads = jax.grad(lambda p: jnp.mean((decoder.apply(p, g) - x) ** 2))(params)
        u, state = opt.update(grads, state, params)
        return optax.apply_updates(params, u), state

    rng = np.random.default_rng(0)
    for _ in range(FLAGS.epochs):
        perm = rng.permutation(len(g))
        for i in range(0, len(perm) - 127, 128):
            params, state = step(params, state, jnp.asarray(g[perm[i : i + 128]]), jnp.asarray(x[perm[i : i + 128]]))
    rec = np.asarray(decoder.apply(params, jnp.asarray(gv)))
    print(f"{mode} MLP ({FLAGS.epochs} epochs): SSIM victims {metrics.ssim(victims_x, rec).mean():.3f}", flush=True)


def main(argv):
    del argv
    model, variables = _setting()
    (features if FLAGS.method == "features" else learned)(model, variables)


if __name__ == "__main__":
    app.run(main)
