r"""Closed-form Jacobian diagonals of equinox's recurrent cells, for quasi-DEER.

`diffrax_deer.scan(..., method="quasi-deer", jacobian_diagonal=...)` needs only the
diagonal of $\partial F / \partial c$ of the step's carry map. Without it the diagonal
costs $D$ Jacobian-vector products along the whole sequence; in closed form it costs
about one evaluation of the cell. The functions here return that closed form for
`equinox.nn.GRUCell` and `equinox.nn.LSTMCell`, as functions `(carry, x) -> diagonal`
for a step whose carry is the cell's hidden state and whose input is the cell's input,
i.e. `step = lambda h, x: (cell(x, h), ...)`.
"""

from collections.abc import Callable

import equinox as eqx
import jax.nn as jnn
import jax.numpy as jnp
from jaxtyping import Array, Float


def _diagonal_blocks(weight: Float[Array, "k*D D"], num_blocks: int) -> list[Array]:
    """The diagonals of the `num_blocks` stacked `(D, D)` blocks of `weight`."""
    return [jnp.diagonal(w) for w in jnp.split(weight, num_blocks)]


def gru_jacobian_diagonal(
    cell: eqx.nn.GRUCell,
) -> Callable[[Float[Array, " D"], Array], Float[Array, " D"]]:
    r"""The diagonal of $\partial h' / \partial h$ for `h' = cell(x, h)`, an
    `equinox.nn.GRUCell`, as a function `(h, x) -> diagonal`.

    With gates $r = \sigma(\cdot + W_r h)$, $z = \sigma(\cdot + W_z h)$, candidate
    $n = \tanh(\cdot + r \odot (W_n h + b_n))$ and $h' = n + z \odot (h - n)$:

    $$\frac{\partial h'_i}{\partial h_i} = (1 - z_i)\, n'_i + z_i
    + (h_i - n_i)\, z_i (1 - z_i) (W_z)_{ii}, \quad
    n'_i = (1 - n_i^2)\big(r_i (1 - r_i) (W_r)_{ii} (W_n h + b_n)_i
    + r_i (W_n)_{ii}\big).$$

    !!! example

        ```python
        cell = eqx.nn.GRUCell(4, 16, key=jax.random.PRNGKey(0))
        step = lambda h, x: (cell(x, h), None)
        h_last, _ = diffrax_deer.scan(
            step, jnp.zeros(16), xs, method="quasi-deer",
            jacobian_diagonal=diffrax_deer.gru_jacobian_diagonal(cell),
        )
        ```
    """
    if not isinstance(cell, eqx.nn.GRUCell):
        raise TypeError(f"Expected an `equinox.nn.GRUCell`; got {type(cell).__name__}.")

    def diagonal(h, x):
        bias = 0 if cell.bias is None else cell.bias
        bias_n = 0 if cell.bias_n is None else cell.bias_n
        i_r, i_z, i_n = jnp.split(cell.weight_ih @ x + bias, 3)
        h_r, h_z, h_n = jnp.split(cell.weight_hh @ h, 3)
        w_r, w_z, w_n = _diagonal_blocks(cell.weight_hh, 3)
        r = jnn.sigmoid(i_r + h_r)
        z = jnn.sigmoid(i_z + h_z)
        pre = h_n + bias_n
        n = jnp.tanh(i_n + r * pre)
        dn = (1 - n**2) * (r * (1 - r) * w_r * pre + r * w_n)
        return (1 - z) * dn + z + (h - n) * z * (1 - z) * w_z

    return diagonal


def lstm_jacobian_diagonal(
    cell: eqx.nn.LSTMCell,
) -> Callable[
    [tuple[Float[Array, " D"], Float[Array, " D"]], Array],
    tuple[Float[Array, " D"], Float[Array, " D"]],
]:
    r"""The diagonal of the Jacobian of `(h', c') = cell(x, (h, c))`, an
    `equinox.nn.LSTMCell`, with respect to its carry `(h, c)`, as a function
    `((h, c), x) -> (dh'/dh diagonal, dc'/dc diagonal)`.

    With gates $i, f, o = \sigma(\cdot + W_{i,f,o} h)$, $g = \tanh(\cdot + W_g h)$,
    $c' = f \odot c + i \odot g$ and $h' = o \odot \tanh c'$:

    $$\frac{\partial c'_k}{\partial c_k} = f_k, \qquad
    \frac{\partial h'_k}{\partial h_k} = o_k (1 - o_k) (W_o)_{kk} \tanh c'_k
    + o_k (1 - \tanh^2 c'_k)\, \frac{\partial c'_k}{\partial h_k},$$
    $$\frac{\partial c'_k}{\partial h_k} = f_k (1 - f_k) (W_f)_{kk}\, c_k
    + i_k (1 - i_k) (W_i)_{kk}\, g_k + i_k (1 - g_k^2) (W_g)_{kk}.$$

    !!! example

        ```python
        cell = eqx.nn.LSTMCell(4, 16, key=jax.random.PRNGKey(0))
        step = lambda hc, x: (cell(x, hc), None)
        zero = jnp.zeros(16)
        (h, c), _ = diffrax_deer.scan(
            step, (zero, zero), xs, method="quasi-deer",
            jacobian_diagonal=diffrax_deer.lstm_jacobian_diagonal(cell),
        )
        ```
    """
    if not isinstance(cell, eqx.nn.LSTMCell):
        raise TypeError(f"Expected an `equinox.nn.LSTMCell`; got {type(cell).__name__}.")

    def diagonal(carry, x):
        h, c = carry
        lin = cell.weight_ih @ x + cell.weight_hh @ h
        if cell.use_bias:
            lin = lin + cell.bias
        pre_i, pre_f, pre_g, pre_o = jnp.split(lin, 4)
        w_i, w_f, w_g, w_o = _diagonal_blocks(cell.weight_hh, 4)
        i, f, o = jnn.sigmoid(pre_i), jnn.sigmoid(pre_f), jnn.sigmoid(pre_o)
        g = jnp.tanh(pre_g)
        tanh_c = jnp.tanh(f * c + i * g)
        dc_dh = f * (1 - f) * w_f * c + i * (1 - i) * w_i * g + i * (1 - g**2) * w_g
        dh_dh = o * (1 - o) * w_o * tanh_c + o * (1 - tanh_c**2) * dc_dh
        return dh_dh, f

    return diagonal
