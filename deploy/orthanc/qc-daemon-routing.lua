-- Orthanc auto-routing: every stable MR series goes to qc-daemon.
--
-- Install: copy to /etc/orthanc/qc-daemon-routing.lua and list it in "LuaScripts" (see qc-daemon.json).
-- "qcdaemon" is the DicomModalities entry that qc-daemon.json defines.
--
-- OnStableSeries fires once a series has received no new instance for StableAge seconds. The series is
-- sent through the REST API as one asynchronous C-STORE job (one association for the whole series).
-- Lua's SendToModality() is NOT used: Orthanc 1.10 treats its argument as an instance ID (it fails with
-- "Unable to read attachment dicom of instance <series id>" when given a series ID).
-- A failed job (qc-daemon down) is not retried by Orthanc: it shows in GET /jobs (and the Explorer's Jobs
-- page); resubmit it with POST /jobs/<id>/resubmit or resend the series by hand.
-- qc-daemon itself accepts every storage SOP class and records non-MR series as skipped; routing only MR
-- keeps the network and its spool free of CT, PET, reports and the like.

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'MR' then
    RestApiPost('/modalities/qcdaemon/store', DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
  end
end
