"""The core: techniques, scopes and policies, schedules, the compressor, checkpoints."""
