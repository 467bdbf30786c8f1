"""`python -m taskbus.gateway`: serve the public API until SIGTERM/SIGINT."""

from taskbus.gateway.app import run

if __name__ == "__main__":
    run()
