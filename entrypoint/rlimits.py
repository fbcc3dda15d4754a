"""The container's open-files limit (`docker run --ulimit nofile=N`, a runtime's default). CRIU
needs room above the highest descriptor the checkpoint's processes hold for its own, and vLLM
opens more than a low limit allows; both fail with lines that do not name the limit (found by
hand, 2026-12-05: with 64, CRIU said "sfd: Can't chose service_fd_base: 0 38" and the normal
start died in a worker's traceback)."""

from __future__ import annotations

import resource
from typing import Optional

# A hard limit below this is named; 256 restored and served the CPU image, 64 did neither. vLLM
# raises its soft limit to the hard one and warns below 65536; Docker's default is 1048576.
ENOUGH = 1024


def too_few_open_files(limits: Optional[tuple[int, int]] = None) -> Optional[str]:
    """What to say where the open-files limit is low (LIMITS: soft, hard; this process's by
    default, which the container gave it), or None."""
    _, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= ENOUGH:
        return None
    return (f"this container's open-files limit is {hard} (docker run --ulimit nofile=..., or the runtime's"
            f" default?), too low for vLLM and for CRIU's restore: raise it to 65536 or more")
