"""``imagineerd smb-conf``: Samba share sections for this install.

Two shares, enforced by Samba itself (not by Unix permissions, which are easy to get wrong):

``[Imagineer]``
    Read-only; shows only the outputs folder, so the original product's path
    ``\\\\HOST\\Imagineer\\outputs`` works and nobody can delete the gallery from Explorer.
``[Imagineer-inbox]``
    Writable drop folder. Writes happen as the daemon's user (``force user``), so the daemon
    can always read and move what people drop, whatever account they connect with.
"""

from __future__ import annotations

import getpass

from .config import Config

#: Names never taken from the inbox; vetoed so they are not even created on the share.
#: (Hidden names, the daemon's own .claimed folder included, are vetoed as "/.*/".)
JUNK_VETO = "/.*/~$*/Thumbs.db/desktop.ini/*.tmp/*.part/*~/"


def smb_conf(
    config: Config, *, guest: bool = False, user: str | None = None, share: str = "Imagineer"
) -> str:
    inbox = config.path_for("inbox").resolve()
    outputs = config.path_for("outputs").resolve()
    root = outputs.parent
    # Everything next to the outputs folder stays invisible in [Imagineer]: what is there now
    # and what the daemon creates there later (state, inbox, the config file).
    ours = [config.path_for("state"), config.path_for("inbox")]
    if config.path is not None:
        ours.append(config.path)
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    names |= {p.resolve().name for p in ours if p.resolve().parent == root}
    hidden = sorted(names - {outputs.name})
    # ".*" vetoes hidden names at every depth: outputs/.trash (deleted images waiting to be
    # restored or purged) and the saver's temporary files are never shown nor fetched.
    veto_root = "/" + "/".join([*hidden, ".*"]) + "/"
    user = user or getpass.getuser()
    # Samba has no end-of-line comments: every comment is a line of its own.
    guest_line, users_line = ("", ";") if guest else (";", "")
    access = (
        "   # Anyone on the network, no password:\n"
        f"   {guest_line}guest ok = yes\n"
        "   # Or only these accounts, separated by spaces (each: sudo smbpasswd -a NAME):\n"
        f"   {users_line}valid users = {user}\n"
    )
    return f"""\
# imagineerd shares for {config.base_dir}
# Append to /etc/samba/smb.conf (nothing in [global] needs to change), then
#   sudo systemctl restart smbd
# Windows: \\\\HOST\\{share}\\outputs and \\\\HOST\\{share}-inbox
# macOS:   smb://HOST/{share}   Linux: smb://HOST/{share}-inbox in the file manager

[{share}]
   comment = imagineerd images (read-only)
   path = {root}
   read only = yes
   browseable = yes
{access}   # Only the outputs folder is visible here; regenerate this section if you add
   # files next to it.
   veto files = {veto_root}
   hide unreadable = yes

[{share}-inbox]
   comment = imagineerd inbox: drop .yaml or .txt prompt files here
   path = {inbox}
   read only = no
   browseable = yes
{access}   # Every write happens as the daemon's user, so it can read and move what is dropped.
   force user = {user}
   create mask = 0664
   force create mode = 0664
   directory mask = 2775
   force directory mode = 2775
   # Junk and hidden names (including the daemon's own .claimed folder) stay out.
   veto files = {JUNK_VETO}
   delete veto files = yes
"""
