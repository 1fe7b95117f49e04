"""Float64 masked-dense reference for the group-shared fixed fan-in layer."""

import torch


def masked_dense_weight(weight, group_index, out_features, in_features):
    """W_dense[p, group_index[p // G, k]] = weight[p, k], built independently of the package."""
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    dense = torch.zeros(out_features, in_features, dtype=torch.float64)
    w = weight.detach().to("cpu", torch.float64)
    idx = group_index.to("cpu", torch.long)
    for p in range(out_features):
        dense[p, idx[p // group_size]] = w[p]
    return dense


def reference_forward_backward(x, weight, group_index, bias, out_features, grad_out):
    """Forward and all gradients in float64 through the masked dense weight."""
    in_features = x.shape[-1]
    dense = masked_dense_weight(weight, group_index, out_features, in_features).requires_grad_(True)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    b64 = None if bias is None else bias.detach().to("cpu", torch.float64).requires_grad_(True)
    out = x64 @ dense.T
    if b64 is not None:
        out = out + b64
    out.backward(grad_out.detach().to("cpu", torch.float64))
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    idx = group_index.to("cpu", torch.long)
    grad_w = torch.zeros(weight.shape, dtype=torch.float64)
    for p in range(out_features):
        grad_w[p] = dense.grad[p, idx[p // group_size]]
    return out.detach(), x64.grad, grad_w, None if b64 is None else b64.grad
