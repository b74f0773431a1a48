"""The transformer as pure functions over a params pytree, and its KV cache."""
