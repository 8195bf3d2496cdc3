"""Writing and state: model folders (export), the daemon's durable state generations, and the
atomic file and folder helpers every writer uses."""
