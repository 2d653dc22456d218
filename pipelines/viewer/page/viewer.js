// The heatmap over the source image: OpenSeadragon shows the Deep Zoom pyramid of the
// slice; two canvas overlays, scaled with the image, hold the tiles (under the opacity
// slider) and, opaque above them, the lesion outlines and the spread arrow. Everything
// comes from this server (scene.json, dzi/, osd/).
"use strict";

// the colour ramp of the Secondary Capture (dicom_heatmap/render.py): 0 dark blue ... 1 red
const RAMP = [[0, 0, 140], [0, 120, 255], [0, 230, 230], [255, 230, 0], [255, 60, 0], [180, 0, 0]];
const CANVAS_SIDE = 4096;  // the overlay's longer side in canvas pixels

function colour(score) {
  const x = Math.min(Math.max(score, 0), 1) * (RAMP.length - 1);
  const low = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - low;
  return RAMP[low].map((v, i) => Math.round((1 - f) * v + f * RAMP[low + 1][i]));
}

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

async function start() {
  const scene = await (await fetch("scene.json")).json();
  document.title = scene.title;
  $("title").textContent = scene.title;
  $("analysis-threshold").textContent = scene.threshold;
  if (scene.warning) {
    $("warning").textContent = "Outside the model's domain: " + scene.warning;
    $("warning").hidden = false;
  }
  for (const name of ["opacity", "threshold"]) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  let slice = Number(params.get("slice") || scene.focus_slice + 1) - 1;
  const viewer = OpenSeadragon({
    id: "view", prefixUrl: "osd/images/", tileSources: `dzi/${slice}.dzi`, showNavigator: true,
    animationTime: 0.4, blendTime: 0, maxZoomPixelRatio: 4, crossOriginPolicy: false,
  });
  const [tilesCanvas, linesCanvas] = [document.createElement("canvas"), document.createElement("canvas")];
  tilesCanvas.className = linesCanvas.className = "heatmap";

  function draw() {
    const [width, height] = scene.size[slice];
    const scale = CANVAS_SIDE / Math.max(width, height);
    for (const canvas of [tilesCanvas, linesCanvas]) {
      canvas.width = Math.max(1, Math.round(width * scale));
      canvas.height = Math.max(1, Math.round(height * scale));
    }
    const from = Number($("threshold").value);
    $("threshold-value").textContent = from.toFixed(2);
    tilesCanvas.style.opacity = $("opacity").value;
    let context = tilesCanvas.getContext("2d");
    const path = (ring) => {
      context.moveTo(ring[0][0] * scale, ring[0][1] * scale);
      for (const [x, y] of ring.slice(1)) context.lineTo(x * scale, y * scale);
      context.closePath();
    };
    for (const tile of scene.tiles) {
      if (tile.slice !== slice || tile.score < from) continue;
      context.beginPath();
      path(tile.ring);
      context.fillStyle = `rgb(${colour(tile.score).join(",")})`;
      context.fill();
    }
    context = linesCanvas.getContext("2d");
    const line = Math.max(3, linesCanvas.width / 400);
    if ($("outlines").checked) {
      context.lineWidth = line;
      for (const lesion of scene.lesions) {
        if (lesion.slice !== slice) continue;
        context.beginPath();
        lesion.rings.forEach(path);
        context.strokeStyle = lesion.number === 1 ? "#ffffff" : "#dddddd";
        context.setLineDash(lesion.number === 1 ? [] : [8, 6]);
        context.stroke();
      }
      context.setLineDash([]);
    }
    const arrow = scene.arrow;
    if (arrow && arrow.slice === slice) {
      const [x0, y0, x1, y1] = [...arrow.from, ...arrow.to].map((v) => v * scale);
      const angle = Math.atan2(y1 - y0, x1 - x0);
      const head = Math.hypot(x1 - x0, y1 - y0) / 4;
      for (const [colour, width] of [["#000000", 2.5 * line], ["#ffffff", line]]) {  // white on a dark edge
        context.lineWidth = width;
        context.strokeStyle = context.fillStyle = colour;
        context.lineJoin = "round";
        context.beginPath();
        context.moveTo(x0, y0);
        context.lineTo(x1, y1);
        context.moveTo(x1, y1);
        context.lineTo(x1 - head * Math.cos(angle - 0.45), y1 - head * Math.sin(angle - 0.45));
        context.lineTo(x1 - head * Math.cos(angle + 0.45), y1 - head * Math.sin(angle + 0.45));
        context.closePath();
        context.stroke();
        context.fill();
      }
    }
  }

  function place() {
    const [width, height] = scene.size[slice];
    const location = viewer.world.getItemAt(0).imageToViewportRectangle(0, 0, width, height);
    viewer.addOverlay({element: tilesCanvas, location});
    viewer.addOverlay({element: linesCanvas, location});
    draw();
    document.body.dataset.ready = "yes";  // for tests: the overlay is on the page
  }
  viewer.addHandler("open", place);

  for (const name of ["opacity", "threshold", "outlines"]) $(name).addEventListener("input", draw);

  if (scene.slices > 1) {
    $("slices").hidden = false;
    $("slice").max = scene.slices;
    const show = (index) => {
      slice = Math.min(Math.max(index, 0), scene.slices - 1);
      $("slice").value = slice + 1;
      $("slice-value").textContent = `${slice + 1} / ${scene.slices}`;
      viewer.open(`dzi/${slice}.dzi`);
    };
    $("slice").addEventListener("change", () => show(Number($("slice").value) - 1));
    $("previous").addEventListener("click", () => show(slice - 1));
    $("next").addEventListener("click", () => show(slice + 1));
    $("slice").value = slice + 1;
    $("slice-value").textContent = `${slice + 1} / ${scene.slices}`;
  }

  // each tile's number and score under the pointer
  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (event) => {
      const point = viewer.viewport.viewerElementToImageCoordinates(event.position);
      const tile = scene.tiles.find((t) => t.slice === slice && inside(point, t.ring));
      const tip = $("tip");
      if (!tile) { tip.hidden = true; return; }
      tip.textContent = `tile ${tile.number}: score ${tile.score.toFixed(3)}` + (tile.lesion ? `, lesion ${tile.lesion}` : "");
      tip.style.left = `${event.originalEvent.clientX + 14}px`;
      tip.style.top = `${event.originalEvent.clientY + 14}px`;
      tip.hidden = false;
    },
    leaveHandler: () => { $("tip").hidden = true; },
  });
}

function inside(point, ring) {  // even-odd rule: a tile is a quadrilateral (rotated when the analysis rotated)
  let hit = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
    const [xi, yi] = ring[i], [xj, yj] = ring[j];
    if ((yi > point.y) !== (yj > point.y) && point.x < ((xj - xi) * (point.y - yi)) / (yj - yi) + xi) hit = !hit;
  }
  return hit;
}

start();
