"""Which host SSH agent the guest gets: the config's `ssh_agent`, else `up`'s SSH_AUTH_SOCK, else none."""

from __future__ import annotations

from boxpark.host.hostservices import SSH_AGENT_GUEST_PATH, ssh_agent



def test_the_environment_of_up_names_the_agent() -> None:
    service, note = ssh_agent("", {"SSH_AUTH_SOCK": "/tmp/agent.1/sock"})
    assert service is not None and note == ""
    assert (service.guest_path, service.host_path) == (SSH_AGENT_GUEST_PATH, "/tmp/agent.1/sock")
    assert SSH_AGENT_GUEST_PATH == "/run/host-services/ssh-auth.sock"  # Docker Desktop's path


def test_the_config_key_wins_and_off_turns_it_off() -> None:
    service, _ = ssh_agent("/srv/agent.sock", {"SSH_AUTH_SOCK": "/tmp/other"})
    assert service is not None and service.host_path == "/srv/agent.sock"
    service, note = ssh_agent("off", {"SSH_AUTH_SOCK": "/tmp/other"})
    assert service is None and "ssh_agent" in note


def test_no_agent_is_said() -> None:
    service, note = ssh_agent("", {})
    assert service is None and "SSH_AUTH_SOCK" in note
