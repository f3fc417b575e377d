"""The researchers' `nnfabric` command points operators to `nnfabric-server`."""

from typer.testing import CliRunner


def test_the_client_cli_points_operators_to_nnfabric_server():
    from nnfabric.cli import app as client_app

    for command in (["serve", "--catalog", "x.yaml"], ["keys", "create", "alice"]):
        result = CliRunner().invoke(client_app, command)
        assert result.exit_code == 2 and "nnfabric-server" in result.output, result.output
