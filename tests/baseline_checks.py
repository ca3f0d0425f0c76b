"""Helpers shared by the VSA and SLA tests: seeded inputs and the Triton-module-vs-reference-module check."""
import torch
import torch.nn.functional as F


def rand(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)


def grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def assert_modules_agree(torch_mod, triton_mod, q, k, v, *extra, dtype, device, gen, low_tol, param_names):
    """Output and every gradient (q, k, v and the module's parameters, named ``param_names``) of the Triton
    module against the reference module. ``extra`` inputs (VSA's layer input) go to both unchanged;
    ``low_tol`` is the rtol = atol used below float32."""
    # the reference runs in float32 on the low-precision values
    q, k, v = (t.to(dtype).float().requires_grad_() for t in (q, k, v))
    ref = torch_mod(q, k, v, *extra)
    qd, kd, vd = (t.detach().to(device, dtype).requires_grad_() for t in (q, k, v))
    out = triton_mod(qd, kd, vd, *(e.to(device) for e in extra))
    assert out.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=low_tol, atol=low_tol)
    torch.testing.assert_close(out.float().cpu(), ref, **tol)

    do = rand(gen, *ref.shape)
    ref_g = grads(ref, (q, k, v, *torch_mod.parameters()), do)
    out_g = grads(out, (qd, kd, vd, *triton_mod.parameters()), do.to(device, dtype))
    for name, g, g_ref in zip(("dq", "dk", "dv", *param_names), out_g, ref_g):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float().cpu(), g_ref, **tol, msg=lambda m: f"{name}: {m}")


def assert_is_full_attention(out, q, k, v, gen):
    """``out`` and its q, k, v gradients equal plain softmax attention's (float32, tight tolerance)."""
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    do = torch.randn(ref.shape, generator=gen).to(q.device)
    for g, g_ref in zip(grads(out, (q, k, v), do), grads(ref, (q, k, v), do)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
