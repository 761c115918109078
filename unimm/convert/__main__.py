"""`python -m unimm.convert`: see unimm/convert/cli.py."""

from unimm.convert import cli

if __name__ == "__main__":
  cli.run()
