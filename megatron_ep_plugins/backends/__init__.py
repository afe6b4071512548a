"""Built-in backends. Each module is a plugin like any third-party one: it is announced through the
``megatron_ep_plugins`` entry-point group, imports its library lazily, and never imports another
backend."""
