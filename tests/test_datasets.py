import os

import pytest

from data_prep import datasets
from media_fixtures import shared_data


def lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


@pytest.mark.parametrize("split, xlsx, listing, count, anomalous", [
    ("train", "ucf_crime_train.xlsx", "Anomaly_Train.txt", 1610, 810),
    ("test", "ucf_crime_test.xlsx", "Anomaly_Test.txt", 290, 140),
])
def test_official_ucf_xlsx_parses_into_the_split_lists(split, xlsx, listing, count, anomalous):
  root = os.path.join(shared_data(), "ucfcrime_ar")
  rows = datasets.read_ucf_xlsx(os.path.join(root, xlsx))
  names = [name for name, _ in rows]
  assert len(names) == count and len(set(names)) == count
  assert all(name == name.strip() and name.endswith(".mp4") for name in names)   # no trailing newline left
  assert set(names) == set(lines(os.path.join(root, listing)))
  assert all(isinstance(caption, str) and caption.strip() for _, caption in rows)
  assert sum(datasets.ucf_label(name) for name in names) == anomalous


def test_ucfcrime_reader_splits_labels_and_events():
  root = os.path.join(shared_data(), "ucfcrime_ar")
  items = datasets.read_ucfcrime_ar("/videos", root)
  assert len(items) == 1900
  test = [i for i in items if i.split == "test"]
  assert len(test) == 290 and sum(i.label for i in test) == 140
  abuse = next(i for i in test if i.video == "Abuse/Abuse028_x264.mp4")
  assert abuse.event_frames == (165, 240) and abuse.label == 1
  assert abuse.path == "/videos/Abuse/Abuse028_x264.mp4"
  assert abuse.array_id == "Abuse028_x264"            # feature releases name their arrays by the stem
  normal = next(i for i in test if "Normal" in i.video)
  assert normal.label == 0 and normal.event_frames is None


def test_ucfcrime_reader_finds_flat_videos(tmp_path):
  root = os.path.join(shared_data(), "ucfcrime_ar")
  (tmp_path / "Abuse028_x264.mp4").write_bytes(b"")
  items = datasets.read_ucfcrime_ar(str(tmp_path), root)
  assert next(i for i in items if i.video == "Abuse/Abuse028_x264.mp4").path == str(tmp_path / "Abuse028_x264.mp4")


def test_xdviolence_reader_ids_labels_and_lists():
  root = os.path.join(shared_data(), "xdviolence_ar")
  items = datasets.read_xdviolence_ar("/xd", root)
  train = [i for i in items if i.split == "train"]
  test = [i for i in items if i.split == "test"]
  assert (len(train), len(test)) == (3954, 800)
  # XD-Violence's test set: 500 violent and 300 non-violent videos.
  assert sum(i.label for i in test) == 500
  first = train[0]
  assert first.video == "Bad.Boys.1995__#00-26-51_00-27-53_label_B2-0-0" and first.label == 1
  assert first.path == "/xd/" + first.video + ".mp4" and first.caption == ""
  assert first.array_id == first.video              # the dots of "Bad.Boys.1995" are not an extension
  assert all(i.label == 0 for i in items if i.video.endswith("_label_A"))
  annotated = next(i for i in test if i.video == "v=u5SF4SlqNDQ__#00-02-39_00-03-41_label_G-0-0")
  assert annotated.event_frames == (77, 1430)


def test_xd_id_and_label_rules():
  assert datasets.xd_id("/media/x/train/A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A__vggish.npy") == \
      "A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A"
  assert datasets.xd_label("A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A") == 0
  assert datasets.xd_label("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6") == 1


def test_folder_reader_defaults_unicode_and_errors(tmp_path):
  table = tmp_path / "captions.csv"
  table.write_text("video,caption\nvidéo_ü.mp4,a man runs\nb.mp4,\n", encoding="utf-8")
  items = datasets.read_folder(str(tmp_path), str(table))
  assert [(i.video, i.caption, i.label, i.split) for i in items] == [
      ("vidéo_ü.mp4", "a man runs", 0, "train"), ("b.mp4", "", 0, "train")]
  assert items[0].path == str(tmp_path / "vidéo_ü.mp4") and items[0].array_id == "vidéo_ü"
  assert datasets.read_folder(None, str(table))[0].path == "vidéo_ü.mp4"   # records from arrays: no videos dir

  with_events = tmp_path / "events.csv"
  with_events.write_text("video,caption,label,split,event_start,event_end\na.mp4,x,1,test,1.5,2.5\nb.mp4,y,0,test,-1,-1\n")
  a, b = datasets.read_folder(str(tmp_path), str(with_events))
  assert (a.label, a.split, a.event, b.event) == (1, "test", (1.5, 2.5), None)

  bad = tmp_path / "bad.csv"
  bad.write_text("name,text\na.mp4,x\n")
  with pytest.raises(datasets.TableError, match="missing column"):
    datasets.read_folder(str(tmp_path), str(bad))
  with pytest.raises(datasets.TableError, match="cannot read"):
    datasets.read_folder(str(tmp_path), str(tmp_path / "absent.csv"))


def test_xlsx_quirks_in_a_small_table(tmp_path):
  import openpyxl
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append(["Video Name", "Chinese Text", "English Text", None, None])
  sheet.append(["Abuse/Abuse001_x264.mp4\n", "中文", "A man hits a dog.", None, None])
  sheet.append([None, None, None, None, None])                      # blank row
  sheet.append(["Normal/Normal_Videos_1.mp4", "中文", 42])            # a caption that is not text
  book.save(tmp_path / "t.xlsx")
  rows = datasets.read_ucf_xlsx(str(tmp_path / "t.xlsx"))
  assert rows == [("Abuse/Abuse001_x264.mp4", "A man hits a dog."), ("Normal/Normal_Videos_1.mp4", 42)]
  (tmp_path / "bad.xlsx").write_bytes(b"not a zip")
  with pytest.raises(datasets.TableError, match="cannot read the xlsx"):
    datasets.read_ucf_xlsx(str(tmp_path / "bad.xlsx"))
