"""The six actors of jobwarden, one module each."""
