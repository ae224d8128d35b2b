"""LLM Learning Lab."""

import logging

# bitsandbytes (imported by peft) warns on every CPU import that an optional faster kernel package (`kernels`)
# is missing; its own CPU 4-bit path works without it (tested), so the warning only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
