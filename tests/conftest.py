"""Run the suite's in-process JAX steps as the CLI runs them: with freed host memory kept for reuse."""

from resnet_jax.cpu.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # before any test starts JAX's threads (pytest loads this file first)
