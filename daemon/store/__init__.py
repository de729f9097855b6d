"""The store: every row jobwarden keeps, and every SQL statement of the project.

`engine` is the Store (one writer thread with group commit, a reader) and the schema; the other
modules hold the statements, grouped by what they serve: `jobs`, `users`. Everything above the
store calls these functions through `Store.write` and `Store.read`; none holds SQL of its own.
"""
