"""FlashFuseMoE: fast, memory-lean Mixture-of-Experts layers for PyTorch.

``MoELayer`` (nn.Module) and ``fused_moe`` (functional) in the Hugging Face transformers v5 expert
layout; compute backends in :mod:`flashfusemoe.backends`, expert-parallel communicators in
:mod:`flashfusemoe.comm`. Importing this package needs no GPU, reads no environment variable and
prints nothing.
"""

from flashfusemoe.balancing import update_expert_bias
from flashfusemoe.functional import fused_moe, router_logits
from flashfusemoe.grad_sync import OverlappedGradSync, get_dense_params, get_expert_params
from flashfusemoe.layer import MoELayer, stack_shared_experts
from flashfusemoe.spec import ACTIVATIONS, RouterConfig, Routing

__all__ = [
    "ACTIVATIONS",
    "MoELayer",
    "OverlappedGradSync",
    "RouterConfig",
    "Routing",
    "fused_moe",
    "get_dense_params",
    "get_expert_params",
    "router_logits",
    "stack_shared_experts",
    "update_expert_bias",
]
__version__ = "0.1.0"
