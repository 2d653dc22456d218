// Test harness (tests/test_slide_viewer.py): the IDC's slide viewer library shows a slide
// stored in Orthanc with one of the project's SEG or Parametric Map series over it, all
// read through Orthanc's DICOMweb (this page is served by Orthanc itself: same origin).
"use strict";

const query = new URLSearchParams(location.search);
const say = (key, value) => { document.body.dataset[key] = value; };
window.addEventListener("error", (event) => say("error", String(event.message)));
window.addEventListener("unhandledrejection", (event) => say("error", String(event.reason && event.reason.message || event.reason)));

async function show() {
  const dmv = window.dicomMicroscopyViewer;
  const client = new DICOMwebClient.api.DICOMwebClient({url: `${location.origin}/dicom-web`});
  const study = query.get("study");
  const slide = await client.retrieveSeriesMetadata({studyInstanceUID: study, seriesInstanceUID: query.get("slide")});
  const images = slide.map((metadata) => new dmv.metadata.VLWholeSlideMicroscopyImage({metadata}));
  const viewer = new dmv.viewer.VolumeImageViewer({client, metadata: images});
  viewer.render({container: "viewport"});
  if (query.get("seg")) {
    const found = await client.retrieveSeriesMetadata({studyInstanceUID: study, seriesInstanceUID: query.get("seg")});
    viewer.addSegments(found.map((metadata) => new dmv.metadata.Segmentation({metadata})));
    for (const segment of viewer.getAllSegments()) viewer.showSegment(segment.uid, {opacity: 1});
    say("shown", viewer.getAllSegments().length);
  }
  if (query.get("pm")) {
    const found = await client.retrieveSeriesMetadata({studyInstanceUID: study, seriesInstanceUID: query.get("pm")});
    viewer.addParameterMappings(found.map((metadata) => new dmv.metadata.ParametricMap({metadata})));
    for (const mapping of viewer.getAllParameterMappings()) viewer.showParameterMapping(mapping.uid, {opacity: 1});
    say("shown", viewer.getAllParameterMappings().length);
  }
  say("ready", "yes");
}

show().catch((error) => say("error", String(error && (error.stack || error.message) || error)));
