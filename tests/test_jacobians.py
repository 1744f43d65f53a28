import jax
import jax.numpy as jnp
import numpy as np

from theory.jacobians import linear_layer_direction, linear_layer_gram, task_jacobian


def layer_losses(weight, inputs, heads, targets):
    """K task losses reading a shared linear layer h = x W^T through per-task heads u_t."""
    representation = inputs @ weight.T
    return jnp.mean((representation @ heads.T - targets) ** 2, axis=0)


def test_task_jacobian_rows_are_the_per_task_gradients():
    keys = jax.random.split(jax.random.key(0), 4)
    weight = jax.random.normal(keys[0], (5, 7))
    inputs, heads = jax.random.normal(keys[1], (11, 7)), jax.random.normal(keys[2], (3, 5))
    targets = jax.random.normal(keys[3], (11, 3))
    params = {"w": weight, "b": jnp.zeros(2)}  # a pytree; 'b' does not enter the losses
    losses, jacobian, unravel = task_jacobian(lambda p: layer_losses(p["w"], inputs, heads, targets), params)
    assert jacobian.shape == (3, 5 * 7 + 2)
    for t in range(3):
        expected = jax.grad(lambda w: layer_losses(w, inputs, heads, targets)[t])(weight)
        np.testing.assert_allclose(unravel(jacobian[t])["w"], expected, rtol=1e-10)
        np.testing.assert_allclose(unravel(jacobian[t])["b"], 0.0)


def test_gram_through_the_batch_equals_the_gram_of_the_jacobian():
    keys = jax.random.split(jax.random.key(1), 4)
    weight = jax.random.normal(keys[0], (6, 9))
    inputs, heads = jax.random.normal(keys[1], (8, 9)), jax.random.normal(keys[2], (4, 6))
    targets = jax.random.normal(keys[3], (8, 4))
    _, jacobian, _ = task_jacobian(lambda w: layer_losses(w, inputs, heads, targets), weight)
    losses, pullback = jax.vjp(lambda h: jnp.mean((h @ heads.T - targets) ** 2, axis=0), inputs @ weight.T)
    (cotangents,) = jax.vmap(pullback)(jnp.eye(4))  # [K, B, out]
    np.testing.assert_allclose(linear_layer_gram(inputs, cotangents), jacobian @ jacobian.T, rtol=1e-10)
    w = jnp.asarray([0.5, -1.0, 2.0, 0.25])
    np.testing.assert_allclose(linear_layer_direction(inputs, cotangents, w), (w @ jacobian).reshape(6, 9),
                               rtol=1e-10, atol=1e-12)


def test_task_jacobian_keeps_float32_parameters_under_x64():
    """The suite runs with jax_enable_x64; float32 parameters give float32 losses, and the one-hot cotangents must
    have the losses' dtype (a float64 eye makes jax.vjp's pullback refuse them). The Jacobian stays float32 and
    matches the float64 one to float32 precision."""
    keys = jax.random.split(jax.random.key(2), 4)
    weight = jax.random.normal(keys[0], (4, 3))
    inputs, heads = jax.random.normal(keys[1], (6, 3)), jax.random.normal(keys[2], (2, 4))
    targets = jax.random.normal(keys[3], (6, 2))
    loss = lambda w: layer_losses(w, inputs.astype(w.dtype), heads.astype(w.dtype), targets.astype(w.dtype))  # noqa
    losses, jacobian, _ = task_jacobian(loss, weight.astype(jnp.float32))
    assert losses.dtype == jacobian.dtype == jnp.float32
    np.testing.assert_allclose(jacobian, task_jacobian(loss, weight)[1], rtol=1e-4, atol=1e-5)
