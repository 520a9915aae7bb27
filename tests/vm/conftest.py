"""vm tier: real QEMU (TCG) guests booted from the ``vm_images/`` test image, with real swtpm.

- ``guest_image`` (session): builds the image through its cache (a no-op when nothing changed),
  showing the build steps on the terminal.
- ``boot_guest`` (function) and ``module_boot_guest`` (module): factories that boot guests and
  stop every QEMU and swtpm they started, by pid, at teardown. Share a module guest between
  tests that do not disturb each other; boot a function guest for anything destructive.
- A failing test gets the console tail, QEMU's stderr and the swtpm log of its guests attached.

A missing ``qemu-system-x86_64`` or ``swtpm`` fails the run; it never skips (STYLE.md §3).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.qemu import GuestConfig, GuestFactory, require_binaries
from vm_images.build import GuestImage, build_image

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest) -> GuestImage:
    """The test guest (kernel, initramfs, SSH key), built on demand through the cache."""
    require_binaries("qemu-system-x86_64", "swtpm")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def progress(msg: str) -> None:
        if reporter is not None:
            reporter.write_line(f"vm_images: {msg}")
        else:
            print(f"vm_images: {msg}", file=sys.stderr)

    return build_image(progress=progress)


@pytest.fixture(scope="session")
def guest_config(guest_image: GuestImage) -> GuestConfig:
    """The base configuration every guest starts from (no devices beyond user networking)."""
    return GuestConfig(
        kernel=guest_image.kernel,
        initramfs=guest_image.initramfs,
        ssh_key=guest_image.ssh_private_key,
        ssh_host_key=guest_image.ssh_host_public_key,
        cmdline=guest_image.cmdline,
    )


@pytest.fixture
def boot_guest(guest_config: GuestConfig, tmp_path: Path) -> Iterator[GuestFactory]:
    """Boot guests for one test; all are stopped afterwards."""
    factory = GuestFactory(guest_config, tmp_path, repo=REPO)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_boot_guest(
    guest_config: GuestConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestFactory]:
    """Boot guests shared by the tests of one module; all are stopped after the module."""
    factory = GuestFactory(guest_config, tmp_path_factory.mktemp("vm"), repo=REPO)
    yield factory
    factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for fixture in ("boot_guest", "module_boot_guest"):
            factory = funcargs.get(fixture)
            if isinstance(factory, GuestFactory):
                for guest in factory.guests:
                    report.sections.append((f"guest {guest.workdir.name}", guest.diagnostics()))
                    if guest.swtpm is not None:
                        report.sections.append(
                            (f"swtpm {guest.workdir.name}", guest.swtpm.log_text()[-4000:])
                        )
    return report
