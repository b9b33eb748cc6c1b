"""The live list's feed: revisions opened or finished since a cursor, each state sent once.

A row's time is set before its transaction commits, so a row can become visible with a time a little before
the cursor; every poll therefore looks :data:`LOOKBACK` back and skips what it has already sent.
"""

from __future__ import annotations

import datetime as dt

from qc_daemon.ghost_check import axis_direction
from qc_daemon.store import SeriesResult, Store, changed_at, results_changed_since

LOOKBACK = dt.timedelta(seconds=30)


def row_view(row: SeriesResult) -> dict:
    """What a page shows of a revision: UIDs, station, description and dates, never patient data."""
    view = row.to_dict()
    for key in ("nifti_path", "montage_path", "quality_map_path"):  # the server's file layout is not for the page
        view.pop(key, None)
    view["ghost_direction"] = axis_direction(row.ghost_axis)
    view["changed_at"] = changed_at(row).isoformat(timespec="milliseconds") + "Z"
    view["url"] = f"/series/{row.series_instance_uid}"
    revision_url = f"{view['url']}/{row.revision}"
    view["montage_url"] = f"{revision_url}/montage.png" if row.montage_path else None
    view["quality_map_url"] = f"{revision_url}/quality_map.nii.gz" if row.quality_map_path else None
    return view


class LiveFeed:
    def __init__(self, store: Store, since: dt.datetime):
        self.store = store
        self.cursor = since
        self._sent: dict[tuple[int, str], dt.datetime] = {}

    def poll(self) -> list[dict]:
        """Rows (as :func:`row_view`) whose new state has not been sent yet, oldest change first."""
        fresh = []
        with self.store.session() as session:
            for row in results_changed_since(session, self.cursor - LOOKBACK):
                key = (row.id, row.status.value)
                if key in self._sent:
                    continue
                when = changed_at(row)
                self._sent[key] = when
                self.cursor = max(self.cursor, when)
                fresh.append(row_view(row))
        horizon = self.cursor - 2 * LOOKBACK
        self._sent = {key: when for key, when in self._sent.items() if when >= horizon}
        return fresh
