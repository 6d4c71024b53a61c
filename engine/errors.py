"""The one exception type the engine raises for problems a user can fix."""


class UnconfusedError(Exception):
    """A message meant for the user: what is wrong, which input, and the fix.

    Nodes let it through unchanged so ComfyUI shows it on the right node. `node` is only given
    for a message about another node than the running one; the running node names itself.
    """

    def __init__(self, message: str, *, node: str | None = None, input: str | None = None):
        if node is None:  # the running node (host.running_node), named once for the whole node
            from .host import current_node_name

            node = current_node_name()
        self.node = node
        self.input = input
        prefix = ""
        if node and input:
            prefix = f"[{node}] input '{input}': "
        elif node:
            prefix = f"[{node}] "
        elif input:
            prefix = f"input '{input}': "
        super().__init__(prefix + message)


class Cancelled(UnconfusedError):
    """Raised outside ComfyUI when the user cancels (Ctrl-C in the CLI, host.request_cancel())."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message, node="")  # the same words on every node
