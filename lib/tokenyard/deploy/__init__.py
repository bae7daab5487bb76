"""Running and inspecting a local deployment: up, down, status, probe."""
