"""The CLI's exit codes, which scripts can rely on (each command's help lists them)."""

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_REDIS, EXIT_NOT_COMPLETED, EXIT_TIMEOUT = 5, 6, 7
EXIT_CODES = (
    "Exit codes: 0 ok (with --wait: job completed); 2 bad usage; 3 invalid input (each bad line is "
    "named on stderr); 4 unknown job; 5 Redis unreachable; 6 the job ended failed, expired or "
    "cancelled (submit: it was cancelled while being submitted); 7 --timeout passed first."
)
