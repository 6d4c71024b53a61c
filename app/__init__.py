"""The pack's headless callers: the command line, job files, the demo flow, the smoke job.

Like nodes/, they call the trainers and the engine; nothing below imports them."""
