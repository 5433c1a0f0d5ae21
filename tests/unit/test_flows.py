"""Coupling flows: inverse round trip and log|det| against the autograd Jacobian, batched and unbatched."""

import pytest
import torch

from frmdn_worldmodels.models.flows import AffineCoupling, CouplingFlow

F64 = torch.float64


def random_flow(dim, blocks=2, hidden=16, context_dim=0, seed=0, scale=0.5):
    """A float64 flow with every weight random, including the zero-initialised last layers (a fresh flow is
    the identity, which would make these tests vacuous)."""
    torch.manual_seed(seed)
    flow = CouplingFlow(dim, blocks=blocks, hidden=hidden, context_dim=context_dim).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.normal_(0.0, scale)
    return flow


def autograd_jacobian(flow, y, context):
    """dz/dy per sample, [..., d, d], from d backward passes (samples are independent, so the gradient of
    sum_batch z_j gives row j of every sample's Jacobian)."""
    y = y.detach().requires_grad_()
    z, _ = flow(y, context)
    rows = [torch.autograd.grad(z[..., j].sum(), y, retain_graph=True)[0] for j in range(y.shape[-1])]
    return torch.stack(rows, dim=-2)


CASES = [
    pytest.param(dim, context_dim, batch, id=f"dim{dim}-ctx{context_dim}-batch{list(batch)}")
    for dim in (2, 3, 5)
    for context_dim in (0, 4)
    for batch in ((), (5,), (3, 4))
]


@pytest.mark.parametrize("dim, context_dim, batch", CASES)
def test_inverse_round_trips_and_log_det_equals_autograd_jacobian(dim, context_dim, batch):
    flow = random_flow(dim, blocks=3, context_dim=context_dim, seed=dim + context_dim)
    y = 2.0 * torch.randn(*batch, dim, dtype=F64)
    context = torch.randn(*batch, context_dim, dtype=F64) if context_dim else None
    z, logdet = flow(y, context)
    assert z.shape == y.shape and logdet.shape == batch
    assert not torch.allclose(z, y), "the random flow should not be the identity"
    torch.testing.assert_close(flow.inverse(z, context), y, rtol=1e-10, atol=1e-10)
    jacobian = autograd_jacobian(flow, y, context)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jacobian).logabsdet, rtol=1e-10, atol=1e-10)
    assert logdet.abs().max() > 1e-3, "the log-determinant should be non-trivial"


def test_context_changes_the_map_and_inverse_uses_the_same_context():
    flow = random_flow(4, context_dim=3, seed=1)
    y = torch.randn(6, 4, dtype=F64)
    first, second = torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    z_first, _ = flow(y, first)
    z_second, _ = flow(y, second)
    assert (z_first - z_second).abs().max() > 1e-3
    assert (flow.inverse(z_first, second) - y).abs().max() > 1e-3


def test_new_flow_is_the_identity():
    flow = CouplingFlow(5, blocks=2, hidden=8, context_dim=2)
    y, context = torch.randn(7, 5), torch.randn(7, 2)
    z, logdet = flow(y, context)
    torch.testing.assert_close(z, y, rtol=0, atol=0)
    torch.testing.assert_close(logdet, torch.zeros(7), rtol=0, atol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_single_block_leaves_conditioner_untouched_and_log_det_is_sum_of_scales(flip):
    torch.manual_seed(2)
    block = AffineCoupling(5, 2, flip=flip, hidden=8).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.5)
    y = torch.randn(10, 5, dtype=F64)
    z, logdet = block(y)
    kept, moved = (slice(2, 5), slice(0, 2)) if flip else (slice(0, 2), slice(2, 5))
    torch.testing.assert_close(z[:, kept], y[:, kept], rtol=0, atol=0)
    log_scale = block.scale(y[:, kept])
    torch.testing.assert_close(z[:, moved], y[:, moved] * log_scale.exp() + block.shift(y[:, kept]))
    torch.testing.assert_close(logdet, log_scale.sum(-1))
    torch.testing.assert_close(block.inverse(z), y)


def test_every_coordinate_is_transformed_with_two_blocks():
    flow = random_flow(5, blocks=2, seed=3)
    y = torch.randn(50, 5, dtype=F64)
    z, _ = flow(y)
    assert ((z - y).abs().amax(0) > 1e-3).all()


def test_gradients_reach_every_parameter():
    flow = random_flow(4, blocks=2, context_dim=2, seed=4)
    y, context = torch.randn(8, 4, dtype=F64), torch.randn(8, 2, dtype=F64)
    z, logdet = flow(y, context)
    (z.square().sum() - logdet.sum()).backward()
    for name, parameter in flow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 1}, "dim >= 2"), ({"dim": 4, "blocks": 0}, "at least one block")],
)
def test_bad_construction_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CouplingFlow(**kwargs)


def test_mismatched_inputs_raise_value_error_naming_the_shapes():
    plain, conditioned = CouplingFlow(4), CouplingFlow(4, context_dim=3)
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        plain(torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        plain.inverse(torch.randn(6, 5))
    with pytest.raises(ValueError, match="no context"):
        plain(torch.randn(6, 4), torch.randn(6, 3))
    with pytest.raises(ValueError, match="got None"):
        conditioned(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"\(1, 3\)"):  # would broadcast over the batch if not refused
        conditioned(torch.randn(6, 4), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\(6, 2\)"):
        conditioned.inverse(torch.randn(6, 4), torch.randn(6, 2))
