"""Planning: what the model holds (read once), and which module gets which structure at which step."""
