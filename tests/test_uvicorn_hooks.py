"""app/connections.py subclasses uvicorn's internal HttpToolsProtocol (pyproject.toml bounds uvicorn's version for
that reason). This fails loudly when an upgrade changes what the subclass relies on: the hooks it overrides,
their signatures, and the attributes it reads; tests/test_connections.py then checks the behaviour."""
import inspect

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.connections import GuardedProtocol

HOOKS = {"connection_made": ["self", "transport"], "connection_lost": ["self", "exc"],
         "on_message_begin": ["self"], "on_headers_complete": ["self"], "shutdown": ["self"]}


def test_the_overridden_hooks_exist_with_the_same_parameters():
    for name, params in HOOKS.items():
        assert name in vars(HttpToolsProtocol), f"uvicorn's HttpToolsProtocol has no {name} any more"
        assert list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters) == params, name
        assert name in vars(GuardedProtocol), f"GuardedProtocol no longer overrides {name}: update this test"


def test_the_attributes_the_subclass_reads_are_still_set_by_uvicorn():
    protocol = inspect.getsource(HttpToolsProtocol)
    for attribute in ("self.connections", "self.transport", "self.cycle", "self.timeout_keep_alive_task",
                      "self.timeout_keep_alive_handler"):
        assert attribute in protocol, f"HttpToolsProtocol no longer sets {attribute}"
    # a request's first byte cancels the keep-alive timeout through uvicorn's own helper (on_message_begin)
    assert "def _unset_keepalive_if_required(self)" in protocol
    cycle = inspect.getsource(RequestResponseCycle)
    for attribute in ("keep_alive", "response_started", "response_complete", "more_body", "transport"):
        assert f"self.{attribute}" in cycle, f"RequestResponseCycle no longer has {attribute}"
    # LingeringClose stands in for the cycle's transport: the cycle must close the connection through it
    assert "self.transport.close()" in cycle and "self.transport.write(" in cycle


def test_uvicorn_makes_its_protocols_as_the_drain_makes_those_it_takes_from_the_backlog():
    """app/__main__.py's ``new_protocol`` builds, for each connection the drain takes from the listener's
    backlog, the protocol uvicorn's ``startup`` would have given it: the same class and the same arguments."""
    import uvicorn

    from app.__main__ import DrainingServer

    startup = inspect.getsource(uvicorn.Server.startup)
    for argument in ("config.http_protocol_class(", "config=config", "server_state=self.server_state",
                     "app_state=self.lifespan.state"):
        assert argument in startup, f"uvicorn's startup no longer makes its protocols with {argument}"
    ours = inspect.getsource(DrainingServer.new_protocol)
    for argument in ("self.config.http_protocol_class(", "config=self.config", "server_state=self.server_state",
                     "app_state=self.lifespan.state"):
        assert argument in ours
