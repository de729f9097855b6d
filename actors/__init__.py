"""The six actors of jobwarden, one module each, with their messages (`messages`), their pure
decisions, and the handler runtime the pool runs jobs in (`handlers`, `services`).

Actors import the wire, the base modules (config, clock, errors, mailbox, metrics, hub) and the
store; nothing from the process, the listeners, the CLI, the client or the tools.
"""
